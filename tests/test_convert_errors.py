"""Every bad input to `lm convert`: one clear line on stderr, a non-zero exit, no traceback, nothing left behind."""

import json
import shutil

from conftest import assert_one_line_error, run_lm


def test_missing_path(tmp_path):
    done = run_lm("convert", tmp_path / "nope", "--dst-path", tmp_path / "ws")
    assert_one_line_error(done, "does not exist")
    assert not (tmp_path / "ws").exists()


def test_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_lm("convert", tmp_path / "empty", "--dst-path", tmp_path / "ws"), "no config.json")
    (tmp_path / "notes.txt").write_text("hello")
    assert_one_line_error(run_lm("convert", tmp_path / "notes.txt", "--dst-path", tmp_path / "ws"), "is not a model")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert_one_line_error(run_lm("convert", tmp_path / "noweights", "--dst-path", tmp_path / "ws"), "no weights")
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text("{not json")
    assert_one_line_error(run_lm("convert", tmp_path / "badjson", "--dst-path", tmp_path / "ws"), "not valid JSON")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    line = assert_one_line_error(run_lm("convert", tmp_path / "gpt2", "--dst-path", tmp_path / "ws"),
                                 "GPT2LMHeadModel")
    for supported in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        assert supported in line


def test_existing_destination_needs_force(tmp_path, smollm2_workspace):
    dst = tmp_path / "ws"
    shutil.copytree(smollm2_workspace, dst)
    before = sorted(p.name for p in dst.iterdir())
    assert_one_line_error(run_lm("convert", "smollm2", "--dst-path", dst), "already exists", "--force")
    assert sorted(p.name for p in dst.iterdir()) == before
    other = tmp_path / "precious"
    other.mkdir()
    (other / "thesis.txt").write_text("years of work")
    assert_one_line_error(run_lm("convert", "smollm2", "--dst-path", other, "--force"), "not an lm workspace")
    assert (other / "thesis.txt").read_text() == "years of work"
    assert_one_line_error(run_lm("convert", "smollm2", "--dst-path", other / "thesis.txt"), "not a folder")


def test_force_replaces_a_workspace(tmp_path, smollm2_workspace):
    dst = tmp_path / "ws"
    shutil.copytree(smollm2_workspace, dst)
    (dst / "stale.txt").write_text("old")
    done = run_lm("convert", "smollm2", "--dst-path", dst, "--force", "--model-name", "fresh")
    assert done.returncode == 0, done.stderr
    assert not (dst / "stale.txt").exists()
    assert json.loads((dst / "lm_workspace.json").read_text())["model_name"] == "fresh"
    assert [p.name for p in tmp_path.iterdir()] == ["ws"]  # no partial folder left


def test_corrupt_gguf(tmp_path, smollm2_gguf):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    assert_one_line_error(run_lm("convert", garbage, "--dst-path", tmp_path / "ws"), "not a valid GGUF")
    truncated = tmp_path / "truncated.gguf"
    with open(smollm2_gguf, "rb") as f:
        truncated.write_bytes(f.read(5_000_000))
    assert_one_line_error(run_lm("convert", truncated, "--dst-path", tmp_path / "ws"), "truncated.gguf")
    assert [p.name for p in tmp_path.iterdir()] == ["garbage.gguf", "truncated.gguf"]


def test_bad_chat_template_and_dtype(tmp_path):
    done = run_lm("convert", "smollm2", "--dst-path", tmp_path / "ws", "--chat-template", "{% for x in %}")
    assert_one_line_error(done, "--chat-template", "not a valid Jinja template")
    done = run_lm("convert", "smollm2", "--dst-path", tmp_path / "ws", "--chat-template", tmp_path / "none.jinja")
    assert_one_line_error(done, "no such file")
    done = run_lm("convert", "smollm2", "--dst-path", tmp_path / "ws", "--dtype", "int3")
    assert done.returncode != 0 and "int3" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "ws").exists()


def test_hub_id_offline(tmp_path):
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    done = run_lm("convert", "some-org/some-model", "--dst-path", tmp_path / "ws", env=env, cwd=tmp_path)
    assert_one_line_error(done, "some-org/some-model", "HF_HUB_OFFLINE=1")


def test_hub_unreachable(tmp_path):
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2"}
    done = run_lm("convert", "some-org/some-model", "--dst-path", tmp_path / "ws", env=env, cwd=tmp_path, timeout=120)
    assert_one_line_error(done, "cannot download some-org/some-model")
