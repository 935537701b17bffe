"""The converted default model is a real chat model: it knows the capital of France."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_default_model_answers_paris(default_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_fetch_killed_mid_way_then_rerun_gives_working_model(tmp_path: Path) -> None:
    """SIGKILL a real `fitserve model fetch` during conversion; the rerun yields a complete model."""
    env = {**os.environ, "FITSERVE_HOME": str(tmp_path)}
    cmd = [str(Path(sys.executable).parent / "fitserve"), "model", "fetch"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    models = tmp_path / "models"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(models.glob(".*tmp-*/gguf")):
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (models / "smollm2-135m-instruct" / ".fitserve-complete").exists()

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    target = Path(done.stdout.strip().splitlines()[-1])
    assert (target / ".fitserve-complete").is_file()
    # the model and its flock file (kept on purpose: unlinking a lock file races with a waiting process); no
    # half-written temporary directory is left behind
    expected = [".smollm2-135m-instruct.lock", "smollm2-135m-instruct"]
    assert sorted(p.name for p in models.iterdir()) == expected
    marker = (target / ".fitserve-complete").stat().st_mtime_ns
    # the rerun is a no-op: no download or conversion (nothing rewritten) and torch is never imported
    again = subprocess.run(
        [sys.executable, "-X", "importtime", *cmd], env=env, capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 0 and Path(again.stdout.strip().splitlines()[-1]) == target
    imported = {
        line.rsplit("|", 1)[-1].strip() for line in again.stderr.splitlines() if line.startswith("import time:")
    }
    assert "fitserve.quant.model_store" in imported and "torch" not in imported
    assert (target / ".fitserve-complete").stat().st_mtime_ns == marker
    assert sorted(p.name for p in models.iterdir()) == expected
