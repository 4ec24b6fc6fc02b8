"""The public functions: bound, hvp, eigsh, dense_hessian, plan, load_digits, and tracking during
training (tracking.py: Tracker, History, Record; plotting.py: plot_history); re-exported by the
package root."""
