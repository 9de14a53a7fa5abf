from setuptools import find_packages, setup

setup(
    name="nnpp",
    version="0.1.0",
    description="Portable UNet++ (nested U-Net, deep supervision) training harness on nnU-Net v2 "
                "for CUDA GPUs, Ascend NPUs and the CPU",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["nnpp", "nnpp.*"]),
    install_requires=[
        # 2.8 is the API we subclass and test (trainer hooks, MetaLogger, predictor); 2.9 may move them. The
        # private nnU-Net internals nnpp overrides are pinned by tests/test_trainer_pins.py (trainer) and
        # tests/test_nnunet_pins.py (predictor), checked against nnunetv2 2.8.1 (patches/ is for 2.8.1 too).
        "nnunetv2>=2.8.1,<2.9",
        "torch>=2.3",  # torch.amp.GradScaler(device_type)
        "SimpleITK>=2.2",
        "numpy",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout"],
        # nnpp_export / nnpp_predict --onnx: torch's dynamo ONNX exporter needs onnxscript
        "onnx": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.2"],
        # nnpp_predict --onnx DIR --ort_provider openvino: OpenVINO's runtime on the same .onnx (CPU);
        # nnpp_export --precision int8 --quantizer nncf: NNCF's int8 for OpenVINO (IR)
        "openvino": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.2", "openvino>=2024.0",
                     "nncf>=2.10"],
    },
    entry_points={
        "console_scripts": [
            "nnpp_train=nnpp.run.train:main",
            "nnpp_distill=nnpp.run.distill:main",
            "nnpp_predict=nnpp.run.predict:main",
            "nnpp_export=nnpp.run.export:main",
            "nnpp_demo=nnpp.run.demo:main",
            "nnpp_change_bs=nnpp.tools.change_bs:main",
            "nnpp_get_dice_result=nnpp.tools.get_dice_result:main",
            "nnpp_convert_v1_model=nnpp.run.convert_v1_model:main",
            "nnpp_plan_and_preprocess=nnpp.run.plan_and_preprocess:main",
            "nnpp_ext_trainer_path=nnpp.run.ext_trainer_path:main",
            "nnpp_prune=nnpp.run.prune:main",
        ],
    },
)
