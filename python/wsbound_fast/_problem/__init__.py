"""What the user asked, validated: the Problem every backend computes on (problem.py), the
activation names (activations.py), every input check (validate.py) and torch input (torch_input.py)."""
