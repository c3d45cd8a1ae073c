"""Shared test set-up: never touch the network, keep CPU runs deterministic and small."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys
from pathlib import Path

# the project's modules are flat files at the repository root
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
