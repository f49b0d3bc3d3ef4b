__version__ = "0.1.0"

# Set here, before any module of the package can import xgboost (libgomp reads it once, when loaded): idle
# OpenMP threads sleep instead of spinning on small shared machines. Why: nbs/00_core.ipynb. nbdev rewrites
# only the __version__ line of this file.
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
