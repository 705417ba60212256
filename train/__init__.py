"""A minimal FSDP2 trainer for STDiT / MVDiT (``python train/run.py``); see train/run.py."""
