"""Spectral tools over the moments and the exact product: Wolkowicz-Styan bounds and the result
types (bounds.py), the rounding allowances (rounding.py), Lanczos (lanczos.py), certificates
(certify.py) and what bound(exact=, certify=) adds after the moments (refine.py)."""
