"""nnpp_ext_trainer_path: print the folder to put into nnU-Net's ``nnUNet_extTrainer``.

    export nnUNet_extTrainer=$(nnpp_ext_trainer_path)

With it, nnU-Net's own commands (``nnUNetv2_predict``, ``nnUNetv2_find_best_configuration``, ``nnUNetv2_ensemble``,
``nnUNetv2_train``) find every nnpp trainer, the distillation students included (nnpp.training.nnunet_ext).
"""
import sys


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return
    if args:
        print(f"nnpp_ext_trainer_path: takes no arguments, got {' '.join(args)}", file=sys.stderr)
        sys.exit(2)
    from nnpp.training.nnunet_ext import EXT_TRAINER_PATH
    print(EXT_TRAINER_PATH)


if __name__ == "__main__":
    main()
