"""The algorithm, written once for every array library (NumPy, torch) through the Python array API:
per-sample features, the pair sum (generic and K route), curvature-vector products and the block
schedule with its fixed-order reduction.  docs/design.md describes the mathematics."""
