"""The unlearning methods, one place each next to its maths (docs/METHODS.md): `jit/` (§1), `ssd.py`
(SSD, LF-SSD, ASSD; §2, importances in `jit_unlearn.importance`) and `deletion/` (DEL, §3)."""
