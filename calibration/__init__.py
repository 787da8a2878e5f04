"""edgead calibration: fit PUAD Gaussian statistics, map quantiles and OK/NG thresholds
from a deployed artifact, at the line, without torch (runtime + scikit-learn)."""
