"""ONNX Runtime in nnU-Net's predictor: sessions, and the module that stands where the torch network stood.

nnU-Net's predictor calls ``self.network(x)`` on patch-sized tiles (sliding window, mirroring) and, for each
fold, ``self.network.load_state_dict(params)`` before predicting with that fold (it averages the folds'
probabilities). :class:`OrtNetwork` is an ``nn.Module`` without parameters whose ``forward`` runs the active
fold's ONNX Runtime session and whose ``load_state_dict`` switches the active fold, so the predictor's own code
does everything else: preprocessing, Gaussian-weighted sliding window, test-time mirroring, fold averaging,
resampling and export. :func:`init_onnx` puts an ``nnpp_export`` folder's sessions into such a predictor.
"""
from __future__ import annotations

import importlib
import os

import numpy as np
import torch
from torch import nn

from nnpp import NnppError
from nnpp import device as dev

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider", "cann": "CANNExecutionProvider",
             "openvino": "OpenVINOExecutionProvider"}
INSTALL_HINTS = {"cuda": "pip install onnxruntime-gpu (instead of onnxruntime)",
                 "tensorrt": "install onnxruntime-gpu built with TensorRT, and TensorRT itself (instead of onnxruntime)",
                 "cann": "install onnxruntime-cann (instead of onnxruntime) and the Ascend CANN toolkit"}
IO_BINDING = ("cuda", "tensorrt")  # tiles stay in CUDA memory: bound in and out, no host round trip
METADATA_FILE = "nnpp_onnx.json"


def require(module: str, extra: str = "onnx"):
    """Import an optional deployment dependency or raise one line saying which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise NnppError(f"{module} is not installed ({e}); install the deployment extra: "
                        f"pip install 'nnpp[{extra}]'") from None


class OpenVinoSession:
    """OpenVINO's CPU plugin reading the same ``.onnx`` (or the OpenVINO IR ``.xml`` + ``.bin`` of an NNCF int8
    export), behind the two session calls :class:`OrtNetwork` makes (``get_inputs()[0].name`` and
    ``run(None, {name: array}) -> [logits]``). ``threads``: INFERENCE_NUM_THREADS (0 = OpenVINO's default); latency
    hint, fp32 inference precision (no silent bf16 on CPUs that have it). The precision hint governs the float
    layers only: an int8 IR's quantized convolutions still run in int8 (checked on OpenVINO 2026.4 from the compiled
    model's runtime info, :func:`runtime_precisions`)."""

    def __init__(self, path: str, threads: int = 0):
        ov = require("openvino", extra="openvino")
        cfg = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            cfg["INFERENCE_NUM_THREADS"] = threads
        try:
            self.model = ov.Core().compile_model(path, "CPU", cfg)
        except Exception as e:
            raise NnppError(f"OpenVINO cannot compile {path} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                            f"{'re-export it' if path.endswith('.xml') else 'use --ort_provider cpu or re-export'}"
                            ) from None
        self.request = self.model.create_infer_request()
        self._input = type("Input", (), {"name": self.model.inputs[0].get_any_name()})()

    def get_inputs(self):
        return [self._input]

    def runtime_precisions(self, layer_type: str = "Convolution") -> list:
        """The execution precision (e.g. ``f32``, ``i8``, ``u8``) of each ``layer_type`` layer of the compiled
        model, from its runtime info."""
        out = []
        for op in self.model.get_runtime_model().get_ops():
            info = op.get_rt_info()
            if info["layerType"].astype(str) == layer_type:
                out.append(info["runtimePrecision"].astype(str).lower())
        return out

    def run(self, _output_names, feed: dict):
        (x,) = feed.values()
        return [self.request.infer({0: x})[self.model.outputs[0]].copy()]


def check_provider(provider: str):
    """Raise one line unless ``provider`` can run here; returns the onnxruntime module."""
    ort = require("onnxruntime")
    if provider not in PROVIDERS:
        raise NnppError(f"unknown ONNX Runtime provider '{provider}'; choose one of {', '.join(PROVIDERS)}")
    available = ort.get_available_providers()
    if provider == "openvino" and PROVIDERS[provider] not in available:
        require("openvino", extra="openvino")
    elif PROVIDERS[provider] not in available:
        raise NnppError(f"--ort_provider {provider}: this onnxruntime has no {PROVIDERS[provider]} (available: "
                        f"{', '.join(available)}); {INSTALL_HINTS.get(provider, 'install an onnxruntime build with it')}")
    return ort


def check_session_providers(session, provider: str, path: str) -> None:
    """Raise one line unless ``session`` really runs on ``provider``'s execution provider (ONNX Runtime falls
    back to the CPU when e.g. CUDA or cuDNN fail to load, and then says so only in a warning)."""
    name = PROVIDERS[provider]
    active = list(session.get_providers())
    if not active or active[0] != name:
        raise NnppError(f"--ort_provider {provider}: ONNX Runtime did not activate {name} for {os.path.basename(path)} "
                        f"(the session runs on {', '.join(active) or 'nothing'}); check the {provider} libraries "
                        f"(ONNX Runtime's log says which failed to load) or choose another --ort_provider")


def make_session(path: str, provider: str = "cpu", threads: int = 0, trt_cache: str | None = None,
                 device_id: int = 0):
    """A session for ``path``: ``provider`` cpu | cuda | tensorrt | cann (``onnxruntime.InferenceSession`` with
    that execution provider only: cuda and tensorrt need onnxruntime-gpu, tensorrt a build with TensorRT, cann
    onnxruntime-cann) | openvino (onnxruntime-openvino's execution provider when installed, else OpenVINO's own
    runtime, :class:`OpenVinoSession`, from the ``openvino`` package). The session's active providers are
    checked (:func:`check_session_providers`): no silent CPU run. ``threads``: intra-op threads (0 = the runtime's
    default: one per physical core). ``trt_cache``: TensorRT engine cache folder (engines are built once per
    model and GPU, then loaded). ``device_id``: the GPU / NPU. ONNX Runtime graph optimisations: all."""
    ort = check_provider(provider)
    if threads < 0:
        raise NnppError(f"--ort_threads must be >= 0 (0 = ONNX Runtime's default), got {threads}")
    name = PROVIDERS[provider]
    if provider == "openvino" and name not in ort.get_available_providers():
        if not os.path.isfile(path):
            raise NnppError(f"{path} is missing; re-export with nnpp_export")
        return OpenVinoSession(path, threads)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # no memory pattern: it plans one block per input shape, and the predictor's batch sizes vary (a case's last
    # group, the out-of-memory halving); measured on the CPU (a UNet++, 23 MiB of activations a sample): batches of 3
    # copies after batch-1 calls raised the peak by 3.2 samples' worth with it, 1.8 without, at the same speed
    # (the rule that sizes batches against it: nnpp.predictor.tiles.nnppPredictor.auto_tta_batch)
    opts.enable_mem_pattern = False
    if provider == "tensorrt":
        options = {"device_id": device_id, "trt_engine_cache_enable": bool(trt_cache)}
        if trt_cache:
            os.makedirs(trt_cache, exist_ok=True)
            options["trt_engine_cache_path"] = os.path.abspath(trt_cache)
        # nodes TensorRT cannot take run on CUDA (checked: TensorRT must be the first active provider)
        providers = [(name, options), ("CUDAExecutionProvider", {"device_id": device_id})]
    elif provider in ("cuda", "cann"):
        providers = [(name, {"device_id": device_id})]
    else:
        providers = [name]
    try:
        session = ort.InferenceSession(path, sess_options=opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for bad files
        raise NnppError(f"ONNX Runtime cannot load {path} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                        f"re-export it with nnpp_export") from None
    check_session_providers(session, provider, path)
    return session


class OrtNetwork(nn.Module):
    """ONNX Runtime sessions (one per fold) behind the ``nn.Module`` calls nnU-Net's predictor makes.

    ``forward(x)``: ``x`` (B, C, *patch) float tensor on any device -> logits (B, classes, *patch) float32 on
    ``x``'s device, from the active fold's session. ``load_state_dict({"onnx_fold": f})`` makes fold ``f`` active
    (the predictor calls it with each entry of :meth:`parameters_list`). No torch parameters, nothing to train.

    For the predictor's memory rule (:meth:`nnpp.predictor.tiles.nnppPredictor.auto_tta_batch`) it answers as a
    torch network would: :meth:`compute_conv_feature_map_size` (``feature_map_size``: the count of the torch network
    the export was built from, elements per sample at the exported patch; unknown counts as too large for a second
    copy per call), ``logits_itemsize`` (bytes of each logit the sessions return) and ``activations_itemsize`` (2 for
    an fp16 export on a GPU provider, else 4). :func:`init_onnx` sets both from the export.
    """

    #: the count (elements) an unknown feature-map size stands for: no second copy per network call fits beside it
    UNKNOWN_FEATURE_MAP_SIZE = 10 ** 15
    #: a batch of n holds n samples' activations beyond nnU-Net's batch-1 calls, not n - 1: ONNX Runtime's arena keeps
    #: the blocks the batch-1 calls used beside the bigger batch's (measured: 1.06 samples' worth for a batch of 2)
    whole_batch_activations = True

    def __init__(self, sessions: dict, io_binding: bool = False, feature_map_size: int | None = None,
                 activations_itemsize: int = 4):
        super().__init__()
        if not sessions:
            raise ValueError("OrtNetwork needs at least one session")
        self.sessions = dict(sessions)
        self.active = next(iter(self.sessions))
        self.input_name = self.sessions[self.active].get_inputs()[0].name
        self.io_binding = io_binding
        self.feature_map_size = feature_map_size
        self.activations_itemsize = activations_itemsize

    def compute_conv_feature_map_size(self, input_size) -> int:
        """The exported network's activations per sample (nnU-Net's count, elements) at ``input_size``, the export's
        patch (the only size the sessions take); unknown: :data:`UNKNOWN_FEATURE_MAP_SIZE`."""
        return self.UNKNOWN_FEATURE_MAP_SIZE if self.feature_map_size is None else int(self.feature_map_size)

    @property
    def logits_itemsize(self) -> int:
        """Bytes of each logit the active session returns (IO binding binds float32; OpenVINO returns f32, its
        precision hint)."""
        outputs = getattr(self.sessions[self.active], "get_outputs", None)
        if self.io_binding or outputs is None:
            return 4
        return {"tensor(float16)": 2, "tensor(bfloat16)": 2, "tensor(double)": 8}.get(outputs()[0].type, 4)

    def parameters_list(self) -> list:
        """What to hand the predictor as ``parameters``: one fold selector per session, in fold order."""
        return [{"onnx_fold": f} for f in self.sessions]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        fold = state_dict.get("onnx_fold") if isinstance(state_dict, dict) else None
        if fold not in self.sessions:
            raise KeyError(f"OrtNetwork has folds {list(self.sessions)}; got {state_dict!r}")
        self.active = fold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.io_binding and x.device.type == "cuda":
            return self._forward_bound(x)
        feed = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        out = self.sessions[self.active].run(None, {self.input_name: feed})[0]
        return torch.from_numpy(out).to(x.device)

    def _forward_bound(self, x: torch.Tensor) -> torch.Tensor:
        """CUDA / TensorRT: input and output bound to CUDA memory (ONNX Runtime's IO binding), so a tile never
        leaves the GPU. Not run on a GPU in this project's CI (no GPU there): the code path of ONNX Runtime's
        documented ``bind_input`` / ``bind_output`` with torch tensors."""
        session = self.sessions[self.active]
        x = x.detach().float().contiguous()
        classes = session.get_outputs()[0].shape[1]
        out = torch.empty((x.shape[0], classes, *x.shape[2:]), dtype=torch.float32, device=x.device)
        binding = session.io_binding()
        index = x.device.index or 0
        binding.bind_input(self.input_name, "cuda", index, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output(session.get_outputs()[0].name, "cuda", index, np.float32, tuple(out.shape), out.data_ptr())
        dev.synchronize(x.device)  # torch wrote x on its own stream; ONNX Runtime reads it on another
        session.run_with_iobinding(binding)
        return out


def load_onnx_folder(folder: str, provider: str = "cpu", threads: int = 0, folds=None, trt_cache: str | None = None,
                     device_id: int = 0) -> tuple[dict, OrtNetwork]:
    """Read an ``nnpp_export`` folder: its metadata (``nnpp_onnx.json``), plans/dataset json, and one session per
    fold (``folds``: a subset of the exported folds, default all). Each ``.onnx`` file is checked against the
    SHA-256 recorded at export, so a replaced or damaged model is refused. An NNCF int8 export (metadata
    ``"runtime": "openvino"``: OpenVINO IR ``fold_F.xml`` + ``fold_F.bin``, both checked) runs only with
    ``provider`` openvino, in :class:`OpenVinoSession`. Returns (metadata, OrtNetwork)."""
    from nnpp.model_folder import load_model_json, sha256_file
    if not os.path.isdir(folder):
        raise NnppError(f"--onnx {folder}: no such folder; export one with nnpp_export")
    meta = load_model_json(os.path.join(folder, METADATA_FILE), f"{METADATA_FILE} (written by nnpp_export)")
    exported = {str(e["fold"]): e for e in meta.get("folds", [])}
    wanted = [str(f) for f in folds] if folds else list(exported)
    unknown = [f for f in wanted if f not in exported]
    if unknown:
        raise NnppError(f"--onnx {folder} has fold(s) {', '.join(exported)}, not {', '.join(unknown)}; pass -f with "
                        f"exported folds or export them")
    ir = meta.get("runtime", "onnxruntime") == "openvino"
    if ir and provider != "openvino":
        raise NnppError(f"--onnx {folder} is an OpenVINO IR (NNCF int8): use --ort_provider openvino "
                        f"(not {provider})")
    sessions = {}
    for f in wanted:
        path = os.path.join(folder, exported[f]["file"])
        files = [(path, exported[f]["sha256"])]
        if exported[f].get("weights_file"):
            files.append((os.path.join(folder, exported[f]["weights_file"]), exported[f].get("weights_sha256")))
        for p, sha in files:
            if not os.path.isfile(p):
                raise NnppError(f"{p} is missing; re-export with nnpp_export")
            if sha256_file(p) != sha:
                raise NnppError(f"{p} is not the file nnpp_export wrote (SHA-256 differs from {METADATA_FILE}); "
                                f"re-export it")
        if ir:
            sessions[f] = OpenVinoSession(path, threads)
        else:
            sessions[f] = make_session(path, provider, threads, trt_cache, device_id)
    return meta, OrtNetwork(sessions, io_binding=provider in IO_BINDING)


def init_onnx(predictor, onnx_folder: str, folds=None, provider: str = "cpu", threads: int = 0,
              trt_cache: str | None = None, device_id: int | None = None) -> dict:
    """Initialise ``predictor`` (:func:`nnpp.predictor.build.make_predictor`) with the ONNX Runtime sessions of an
    nnpp_export folder (its plans.json, dataset.json and mirroring axes; ``folds`` a subset of the exported ones).
    ``device_id``: the accelerator the provider runs on (default: the predictor's device index; under torchrun the
    local rank, also for providers whose tiles stay on the host such as cann). Returns the export metadata."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnpp.model_folder import load_model_json
    from nnpp.predictor.build import undo_compile
    meta, network = load_onnx_folder(onnx_folder, provider, threads, folds, trt_cache,
                                     device_id=(predictor.device.index or 0) if device_id is None else device_id)
    plans = load_model_json(os.path.join(onnx_folder, "plans.json"), "plans.json of the ONNX export")
    dataset_json = load_model_json(os.path.join(onnx_folder, "dataset.json"), "dataset.json of the ONNX export")
    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(meta["source"]["configuration"])
    if list(configuration_manager.patch_size) != list(meta["patch_size"]):
        raise NnppError(f"{onnx_folder}: plans.json patch {configuration_manager.patch_size} differs from the "
                        f"exported models' {meta['patch_size']}; re-export")
    mirror = meta.get("inference_allowed_mirroring_axes")
    network.feature_map_size = exported_feature_map_size(meta, plans_manager, configuration_manager, dataset_json)
    # fp16 exports compute in fp16 on GPU providers; ONNX Runtime's CPU provider casts them to fp32 around its
    # fp32 kernels (measured: the same peak as the fp32 model)
    network.activations_itemsize = 2 if meta.get("precision") == "fp16" and provider in IO_BINDING else 4
    predictor.manual_initialization(network, plans_manager, configuration_manager, network.parameters_list(),
                                    dataset_json, meta["source"]["trainer"], tuple(mirror) if mirror is not None else None)
    undo_compile(predictor, False)
    return meta


def exported_feature_map_size(meta: dict, plans_manager, configuration_manager, dataset_json: dict) -> int | None:
    """Activations per sample of the torch network an export was built from, at its patch (nnU-Net's
    ``compute_conv_feature_map_size``, elements): the number nnpp_export recorded (``feature_map_size`` in
    nnpp_onnx.json), else rebuilt from the export's plans.json and trainer class on the meta device (no weights,
    no memory; exports made before the number was recorded). None when neither works (e.g. a trainer class that
    cannot be imported here)."""
    if meta.get("feature_map_size"):
        return int(meta["feature_map_size"])
    from nnpp.model_folder import build_network, find_trainer_class, io_channels
    try:
        trainer_class = find_trainer_class(meta["source"]["trainer"])
        n_in, n_out = io_channels(plans_manager, configuration_manager, dataset_json)
        with torch.device("meta"):
            network = build_network(trainer_class, plans_manager, configuration_manager, n_in, n_out)
        return int(network.compute_conv_feature_map_size([int(p) for p in meta["patch_size"]]))
    except Exception:  # a memory estimate must not stop a prediction: unknown counts as too large (OrtNetwork)
        return None
