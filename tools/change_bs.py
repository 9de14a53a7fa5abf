"""Seed-compatible script: python tools/change_bs.py -path ENV_ROOT -size N (see nnpp.tools.change_bs)."""
from nnpp.tools.change_bs import main

if __name__ == "__main__":
    main()
