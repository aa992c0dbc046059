"""The pipeline from a tiny T5Gemma preset directory to a version storygen-serve answers through
all four signatures; and an unreadable preset stops it before anything is written. (The pipeline
treats every architecture alike; each one's fine-tuning and export is checked in
pretrained_test.py, so one architecture, the richest, goes end to end.)"""

import os

import pytest
import tensorflow as tf

import preset_fixtures
from conftest import run_cli
from serving_fixtures import ServerProcess, predict_request, stories

PROMPTS = ["从前有座山，", "Once upon a time"]


def test_a_hub_handle_without_network_stops_the_pipeline_before_it_writes(tmp_path):
    result = run_cli("pipeline.run", "--init_from=t5_small_multi", f"--pipeline_root={tmp_path / 'runs'}",
                     f"--serving_model_dir={tmp_path / 'models'}")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "'t5_small_multi'" in lines[0] and "--init_from=DIR" in lines[0], result.stderr
    assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_pipeline_fine_tunes_a_preset_that_storygen_serve_answers(tmp_path):
    preset = preset_fixtures.save_t5gemma_preset(str(tmp_path / "preset"))
    models = tmp_path / "models"
    result = run_cli("pipeline.run", f"--init_from={preset}", "--builtin_count=240", "--epochs=1", "--batch_size=8",
                     "--max_prompt_tokens=16", "--max_story_tokens=48", "--eval_generate_count=4", "--force_push",
                     f"--pipeline_root={tmp_path / 'runs'}", f"--serving_model_dir={models}", "--run_id=preset")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "the preset's tokenizer" in result.stdout
    assert os.path.isfile(tmp_path / "runs" / "preset" / "trainer" / "preset" / "task.json")
    server = ServerProcess(str(models / "storygen"), tmp_path / "server.log").wait_ready(1)
    try:
        written = stories(server.predict(PROMPTS))
        assert len(written) == 2 and all(written)
        generated = server.predict(PROMPTS, "generate", max_new_tokens=8, temperature=0.0, top_k=0, top_p=1.0,
                                   seed=1)
        assert tf.make_ndarray(generated.outputs["token_ids"]).shape[0] == 2
        beams = server.predict(PROMPTS, "beam_search", max_new_tokens=6, num_beams=2)
        assert all(stories(beams))
        request = predict_request(PROMPTS, "score")
        request.inputs["story"].CopyFrom(tf.make_tensor_proto([s.encode() for s in written], dtype=tf.string))
        scored = server.prediction.Predict(request, timeout=60)
        assert (tf.make_ndarray(scored.outputs["log_likelihood"]) < 0).all()
    finally:
        server.stop()
