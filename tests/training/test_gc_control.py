"""training/gc_control.py: automatic collection is off while training, generation 1 is collected on schedule, and
the collector is back on at the end (also when training was started with it on)."""

import gc
from types import SimpleNamespace

import pytest

from so8t_hf.training.gc_control import GarbageCollectionCallback


def test_scheduled_collection(monkeypatch):
    calls = []
    real_collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda generation=2: calls.append(generation) or 0)
    assert gc.isenabled()
    cb = GarbageCollectionCallback(3)
    try:
        cb.on_train_begin(None, SimpleNamespace(global_step=0), None)
        assert not gc.isenabled() and calls == [1]
        for step in range(1, 8):
            cb.on_step_end(None, SimpleNamespace(global_step=step), None)
        assert calls == [1, 1, 1]  # steps 3 and 6
    finally:
        cb.on_train_end(None, None, None)
        monkeypatch.setattr(gc, "collect", real_collect)
    assert gc.isenabled()


def test_zero_keeps_the_automatic_collector_and_negative_is_refused():
    cb = GarbageCollectionCallback(0)
    cb.on_train_begin(None, SimpleNamespace(global_step=0), None)
    assert gc.isenabled()
    cb.on_train_end(None, None, None)
    assert gc.isenabled()
    with pytest.raises(ValueError, match="gc_every_steps must be >= 0"):
        GarbageCollectionCallback(-1)


def test_the_trainer_registers_it_and_training_turns_the_collector_back_on(tmp_path):
    from test_trainer import make_trainer

    trainer = make_trainer(tmp_path, max_steps=2)
    assert trainer.args.gc_every_steps == 50
    assert [c.every_steps for c in trainer.callback_handler.callbacks if isinstance(c, GarbageCollectionCallback)] == [50]
    trainer.train()
    assert gc.isenabled()
