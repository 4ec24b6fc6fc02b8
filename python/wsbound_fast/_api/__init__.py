"""The public functions: bound, hvp, eigsh, dense_hessian, plan, load_digits (re-exported by the
package root)."""
