"""Planning: the cost model (cost.py: flops and memory per term, for the planner, wsb.plan and
bench/) and the block plans of each backend within memory_limit (blocks.py)."""
