"""yolods: train Ultralytics YOLO detectors at cluster scale with DeepSpeed.

Importing the package prepares the process environment (offline Ultralytics, launcher variables) before
Ultralytics or DeepSpeed are imported, because both read their environment once, at import time.
"""

from yolods.env import prepare_process_env

prepare_process_env()

__version__ = "0.1.0"
