"""Train STDiT/MVDiT on OpenVid-1M-format data (the trainer itself arrives with the trainer issue, #9).

Until then this entry point says so plainly instead of pretending to train.
"""

import sys


def main() -> int:
    print(
        "train/run.py: the trainer is not implemented yet (issue #9: a minimal FSDP2 trainer with an embedded "
        "default run). What works today: the fused adaLN ops in openvid_kernels; see README.md.",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
