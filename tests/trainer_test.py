import glob
import json
import os

import keras
import pytest

from components import trainer, transform
from components.tokenizer import make_tokenizer


@pytest.fixture(scope="module")
def trained(small_examples, spm_proto, tmp_path_factory):
    import sentencepiece as spm

    keras.utils.set_random_seed(3)
    tok = make_tokenizer(spm_proto)
    shapes = dict(max_prompt_tokens=16, max_story_tokens=64)
    train_data = transform.training_batches(small_examples, "train", tok, batch_size=8, shuffle=True, seed=1, **shapes)
    eval_data = transform.training_batches(small_examples, "eval", tok, batch_size=8, shuffle=False, **shapes)
    steps, tokens = transform.count_batches(train_data)
    config = dict(vocab_size=spm.SentencePieceProcessor(model_proto=spm_proto).get_piece_size(), d_model=32,
                  num_layers=1, num_heads=2, ff_dim=64, **shapes)
    out = tmp_path_factory.mktemp("trainer")
    metrics = trainer.train(train_data, eval_data, str(out), model_config=config, epochs=2, steps_per_epoch=steps,
                            tokens_per_epoch=tokens, validation_steps=transform.count_batches(eval_data)[0],
                            learning_rate=3e-3, warmup_steps=5, weight_decay=0.01, strategy_name="default",
                            tokenizer=tok, profile_steps=(2, 3), verbose=0)
    return out, metrics, steps


def test_metrics_and_files(trained):
    out, metrics, steps = trained
    assert metrics["loss"] < 7 and metrics["val_perplexity"] > 1
    assert {"tokens_per_second", "learning_rate", "gradient_norm", "perplexity"} <= set(metrics)
    history = json.loads((out / "history.json").read_text())
    assert len(history["loss"]) == 2 and history["loss"][1] < history["loss"][0]
    assert sorted(os.listdir(out / "checkpoints")) == ["epoch-001.weights.h5", "epoch-002.weights.h5"]
    assert trainer.load_model(str(out)).count_params() > 0


def test_profiler_trace_is_written(trained):
    out, _, _ = trained
    assert glob.glob(str(out / "logs" / "train" / "plugins" / "profile" / "*" / "*.xplane.pb"))


def test_learning_rate_warms_up_then_decays():
    schedule = trainer.learning_rate_schedule(1e-3, warmup_steps=10, total_steps=110)
    rates = [float(schedule(step)) for step in (0, 5, 10, 60, 110)]
    assert rates[0] == 0.0 and rates[1] == pytest.approx(5e-4) and rates[2] == pytest.approx(1e-3)
    assert rates[2] > rates[3] > rates[4] == pytest.approx(1e-4)


def test_unknown_strategy_is_a_user_error():
    from components.common import UserError

    with pytest.raises(UserError, match="Unknown --distribution_strategy 'tpu9'"):
        trainer.make_strategy("tpu9")
