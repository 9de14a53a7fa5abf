"""Seed-compatible script: python tools/get_dice_result.py -path ENV_ROOT -mode 1p|8p (see nnpp.tools.get_dice_result)."""
from nnpp.tools.get_dice_result import main

if __name__ == "__main__":
    main()
