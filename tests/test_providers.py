"""ONNX Runtime providers do what they say: a provider this onnxruntime lacks is one line before anything loads,
and a session that did not activate the requested provider (ONNX Runtime's silent CPU fallback) is refused.
No GPU / NPU here: the CUDA, TensorRT and CANN sessions are fakes that report which providers they got."""
import pytest

pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed (pip install -e '.[onnx]')")
import onnxruntime as ort  # noqa: E402

from nnpp import NnppError  # noqa: E402
from nnpp.deploy import ort as nnpp_ort  # noqa: E402


@pytest.mark.parametrize("provider,name,hint", [
    ("tensorrt", "TensorrtExecutionProvider", "TensorRT"),
    ("cann", "CANNExecutionProvider", "onnxruntime-cann"),
    ("cuda", "CUDAExecutionProvider", "onnxruntime-gpu"),
])
def test_provider_not_installed_is_one_line(provider, name, hint):
    if name in ort.get_available_providers():
        pytest.skip(f"{name} is installed here")
    with pytest.raises(NnppError) as e:
        nnpp_ort.make_session("unused.onnx", provider)
    assert f"--ort_provider {provider}: this onnxruntime has no {name}" in str(e.value) and hint in str(e.value)
    assert "\n" not in str(e.value)


class FakeSession:
    """An InferenceSession that got ``active`` providers whatever was asked (as ONNX Runtime does when CUDA fails
    to load: it warns and runs on the CPU)."""
    active = ["CPUExecutionProvider"]
    asked = []

    def __init__(self, path, sess_options=None, providers=None):
        FakeSession.asked.append(providers)

    def get_providers(self):
        return list(self.active)


@pytest.fixture
def fake_ort(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CANNExecutionProvider",
                                 "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    FakeSession.asked = []
    return FakeSession


@pytest.mark.parametrize("provider", ["cuda", "tensorrt", "cann"])
def test_session_without_the_requested_provider_is_refused(fake_ort, monkeypatch, provider):
    monkeypatch.setattr(fake_ort, "active", ["CPUExecutionProvider"])
    with pytest.raises(NnppError, match=f"--ort_provider {provider}: ONNX Runtime did not activate "
                                        f"{nnpp_ort.PROVIDERS[provider]} for m.onnx \\(the session runs on "
                                        f"CPUExecutionProvider\\)"):
        nnpp_ort.make_session("/x/m.onnx", provider)
    # no CPU fallback was asked for
    (asked,) = fake_ort.asked
    assert all((p[0] if isinstance(p, tuple) else p) != "CPUExecutionProvider" for p in asked)
    # the same session with the provider active is accepted
    monkeypatch.setattr(fake_ort, "active", [nnpp_ort.PROVIDERS[provider], "CPUExecutionProvider"])
    assert nnpp_ort.make_session("/x/m.onnx", provider).get_providers()[0] == nnpp_ort.PROVIDERS[provider]


def test_tensorrt_engine_cache_and_cuda_for_the_rest(fake_ort, monkeypatch, tmp_path):
    monkeypatch.setattr(fake_ort, "active", ["TensorrtExecutionProvider", "CUDAExecutionProvider"])
    nnpp_ort.make_session("m.onnx", "tensorrt", trt_cache=str(tmp_path / "engines"), device_id=1)
    ((trt, trt_opts), (cuda, cuda_opts)) = fake_ort.asked[0]
    assert (trt, cuda) == ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    assert trt_opts["trt_engine_cache_enable"] and trt_opts["trt_engine_cache_path"] == str(tmp_path / "engines")
    assert trt_opts["device_id"] == cuda_opts["device_id"] == 1 and (tmp_path / "engines").is_dir()


def test_cli_missing_provider_is_one_line_before_loading(tmp_path, capsys):
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("TensorRT is installed here")
    assert "no TensorrtExecutionProvider" in _predict_usage_error(tmp_path, capsys, "--ort_provider", "tensorrt")


def test_cli_amp_with_onnx_is_one_line(tmp_path, capsys):
    """--amp is torch's precision: with --onnx it would be ignored, so it is refused (the export sets precision)."""
    assert "nnpp_export --precision" in _predict_usage_error(tmp_path, capsys, "--amp", "bf16")


def _predict_usage_error(tmp_path, capsys, *flags) -> str:
    """nnpp_predict --onnx with ``flags``: exit 2, one 'error:' line, no output folder; returns stderr."""
    from nnpp.run import predict
    with pytest.raises(SystemExit) as e:
        predict.main(["-i", str(tmp_path), "-o", str(tmp_path / "o"), "--onnx", str(tmp_path / "none"), *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("error:") == 1
    assert not (tmp_path / "o").exists()
    return err


def test_torchrun_rank_gets_its_own_accelerator_for_host_fed_providers(monkeypatch, tmp_path):
    """Under torchrun, a provider whose tiles stay on the host (cann: the torch device is the CPU) still runs each
    rank on its own accelerator: LOCAL_RANK is the provider's device_id, not the CPU device's (absent) index."""
    import torch

    from nnpp.deploy.ort import init_onnx
    from nnpp.predictor.build import make_predictor
    seen = {}

    def fake_load(folder, provider, threads, folds, trt_cache, device_id=0):
        seen["device_id"] = device_id
        raise SystemExit(0)  # stop before reading the folder: only the device choice matters here
    monkeypatch.setattr("nnpp.deploy.ort.load_onnx_folder", fake_load)
    pred = make_predictor(torch.device("cpu"))
    with pytest.raises(SystemExit):
        init_onnx(pred, str(tmp_path), provider="cann", device_id=3)
    assert seen["device_id"] == 3
    with pytest.raises(SystemExit):
        init_onnx(pred, str(tmp_path), provider="cann")
    assert seen["device_id"] == 0
