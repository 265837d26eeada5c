"""The Hugging Face Trainer integration end to end: a tiny random GPT-2 (no download) trained by MixingTrainer.

Every check compares against an independent replay of the mixer protocol: a fresh mixer fed the logged
evaluations must want them at the same steps and ask for exactly the group counts that were drawn.
"""
import importlib.util
import os
import subprocess
import sys
import types

import pytest
import torch

from aioli_ext.mixing import Aioli, GroupEvaluator, Static, Stratified

HAVE_HF = all(importlib.util.find_spec(name) is not None for name in ("transformers", "accelerate"))
needs_hf = pytest.mark.skipif(not HAVE_HF, reason="transformers and accelerate are not installed (the hf extra)")

if HAVE_HF:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from aioli_ext.integrations.huggingface import MIXING_STATE_FILE, MixingCallback, MixingTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 64
CONTEXT = 16
PER_DEVICE = 4
ACCUMULATION = 2
GLOBAL_BATCH = PER_DEVICE * ACCUMULATION
STEPS = 30
SAVE_AT = 15                     # inside a LearnParams sub-phase of Aioli's second round


def _synthetic_groups(sequences, seed):
    spec = importlib.util.spec_from_file_location("plain_loop_example", os.path.join(ROOT, "examples",
                                                                                     "plain_loop.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.synthetic_groups(sequences, CONTEXT, VOCAB, seed=seed)


class RecordingDataset(torch.utils.data.Dataset):
    """Global sample id i = row i of the concatenated groups; remembers every id read, in order."""

    def __init__(self, groups):
        self.tokens = torch.cat(groups)
        self.offsets = [0]
        for g in groups:
            self.offsets.append(self.offsets[-1] + len(g))
        self.reads = []

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, index):
        self.reads.append(int(index))
        row = self.tokens[index]
        return {"input_ids": row, "labels": row.clone()}

    def group_of(self, index):
        return sum(index >= start for start in self.offsets[1:])


def _make_mixer(method):
    if method == "aioli":
        return Aioli(3, update_steps=10, lp_sweeps=1, lp_steps=2, one_hot=0.75, eta=1.0, total_steps=STEPS, seed=0)
    return Stratified(3)


def _run(method, out, *, resume_from=None, max_steps=STEPS, callbacks=()):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=32, n_layer=1, n_head=2,
                                               bos_token_id=0, eos_token_id=0))
    dataset = RecordingDataset(_synthetic_groups(64, seed=0))
    group_evaluator = GroupEvaluator.from_group_sequences(_synthetic_groups(8, seed=1), batch_size=24)
    holder = {}
    evaluation_steps = []

    def evaluate(model_to_score):
        # The Trainer's step counter at the moment of the evaluation: it must be the step the mixer observes.
        evaluation_steps.append(holder["trainer"].state.global_step)
        return group_evaluator(model_to_score)

    mixer = _make_mixer(method)
    mixing = MixingCallback(mixer, evaluate, group_sizes=[64, 64, 64], seed=3,
                            group_names=["cycle", "markov", "noise"])
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=PER_DEVICE,
                             gradient_accumulation_steps=ACCUMULATION, learning_rate=1e-2, logging_steps=5,
                             save_steps=SAVE_AT, report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    trainer = MixingTrainer(model=model, args=args, train_dataset=dataset, callbacks=[mixing, *callbacks])
    holder["trainer"] = trainer
    trainer.train(resume_from_checkpoint=resume_from)
    return types.SimpleNamespace(trainer=trainer, mixer=mixer, mixing=mixing, dataset=dataset, model=model,
                                 evaluation_steps=evaluation_steps)


def _replay_counts(method, mixer, start, stop):
    """Per-step group counts a fresh mixer asks for when fed the logged evaluations (and the steps it wants
    them at)."""
    fresh = _make_mixer(method)
    logged = {entry["step"]: entry["losses"] for entry in mixer.log.evaluations}
    wanted, counts = [], []
    for step in range(stop):
        if fresh.wants_eval(step):
            wanted.append(step)
            fresh.observe(step, torch.tensor(logged[step], dtype=torch.float64))
        if step >= start:
            counts.append(fresh.group_counts(step, GLOBAL_BATCH))
    return wanted, torch.stack(counts)


def _drawn_counts(run):
    groups = torch.tensor([run.dataset.group_of(i) for i in run.dataset.reads])
    per_step = groups.view(-1, GLOBAL_BATCH)
    return torch.stack([torch.bincount(row, minlength=3) for row in per_step])


@pytest.fixture(scope="module")
def aioli_run(tmp_path_factory):
    return _run("aioli", tmp_path_factory.mktemp("aioli"))


@needs_hf
@pytest.mark.parametrize("method", ["aioli", "stratified"])
def test_batches_follow_the_mixer_and_evaluations_come_when_wanted(method, aioli_run, tmp_path):
    run = aioli_run if method == "aioli" else _run(method, tmp_path)
    assert run.trainer.state.global_step == STEPS
    assert len(run.dataset.reads) == STEPS * GLOBAL_BATCH
    wanted, expected = _replay_counts(method, run.mixer, 0, STEPS)
    # Every micro-batch of step s follows the counts the mixer chose for step s: no prefetch lag.
    assert torch.equal(_drawn_counts(run), expected)
    observed = [entry["step"] for entry in run.mixer.log.evaluations]
    assert observed == wanted
    # Evaluations happened when the Trainer had taken exactly that many optimizer steps.
    assert run.evaluation_steps == wanted
    if method == "aioli":
        # rounds of 10 steps: evaluations at 0, after each of the 3 LearnParams sub-phases of 2 steps, ...
        assert wanted == [0, 2, 4, 6, 10, 12, 14, 16, 20, 22, 24, 26]
        assert len({tuple(row.tolist()) for row in expected}) > 3
        first, last = run.mixer.log.evaluations[0]["losses"], run.mixer.log.evaluations[-1]["losses"]
        assert last[0] < first[0] - 0.3            # the model trained: the counting cycle is being learned
    else:
        assert wanted == [] and run.evaluation_steps == []
        assert set(map(tuple, expected.tolist())) <= {(3, 3, 2), (3, 2, 3), (2, 3, 3)}


@needs_hf
def test_proportions_are_logged_with_the_training_loss(aioli_run):
    table = aioli_run.mixer.log.proportions_per_step(STEPS)
    logged = [entry for entry in aioli_run.trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [5, 10, 15, 20, 25, 30]
    for entry in logged:
        values = [entry[f"mixing/p_{name}"] for name in ("cycle", "markov", "noise")]
        # Logged after step `step` was trained: the proportions of the last step drawn, step - 1.
        assert values == table[entry["step"] - 1].tolist()
        last_eval = [e for e in aioli_run.mixer.log.evaluations if e["step"] < entry["step"]][-1]
        assert [entry[f"mixing/val_loss_{name}"] for name in ("cycle", "markov", "noise")] == last_eval["losses"]


@needs_hf
def test_resume_from_a_checkpoint_continues_the_same_stream(aioli_run, tmp_path):
    checkpoint = os.path.join(aioli_run.trainer.args.output_dir, f"checkpoint-{SAVE_AT}")
    assert os.path.isfile(os.path.join(checkpoint, MIXING_STATE_FILE))
    resumed = _run("aioli", tmp_path, resume_from=checkpoint)
    assert resumed.dataset.reads == aioli_run.dataset.reads[SAVE_AT * GLOBAL_BATCH:]
    assert resumed.mixer.log.to_dict() == aioli_run.mixer.log.to_dict()
    assert resumed.evaluation_steps == [s for s in aioli_run.evaluation_steps if s >= SAVE_AT]
    for (name, a), b in zip(aioli_run.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.mixing.sampler.state_dict()["cursor"].tolist() == \
        aioli_run.mixing.sampler.state_dict()["cursor"].tolist()


@needs_hf
def test_rank_slices_are_disjoint_parts_of_the_single_process_batch():
    def bound(rank, world_size):
        args = types.SimpleNamespace(max_steps=4, auto_find_batch_size=False, gradient_accumulation_steps=2,
                                     train_batch_size=3 * 2 // world_size, world_size=world_size,
                                     process_index=rank, device=torch.device("cpu"))
        callback = MixingCallback(Static(3, [0.5, 0.3, 0.2]), lambda model: None, group_sizes=[50, 30, 20],
                                  seed=5)
        callback.bind(args)
        return callback

    single = bound(0, 1)
    ranks = [bound(0, 2), bound(1, 2)]
    assert single.global_batch == ranks[0].global_batch == 12
    for step in range(4):
        whole = single.draw_step(None, step, 2)
        parts = [callback.draw_step(None, step, 2) for callback in ranks]
        assert all(len(micro) == 3 for part in parts for micro in part)
        flat = [i for part in parts for micro in part for i in micro]
        assert len(set(flat)) == len(flat)
        assert sorted(flat) == sorted(i for micro in whole for i in micro)


@needs_hf
def test_callback_refuses_a_plain_trainer_and_bad_settings(tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=32, n_layer=1, n_head=2,
                                               bos_token_id=0, eos_token_id=0))
    dataset = RecordingDataset(_synthetic_groups(8, seed=0))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, disable_tqdm=True)
    plain = Trainer(model=model, args=args, train_dataset=dataset,
                    callbacks=[MixingCallback(Stratified(3), lambda m: None, group_sizes=[8, 8, 8])])
    with pytest.raises(TypeError, match="draws the batches itself: train with MixingTrainer"):
        plain.train()
    epochs = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=1, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match=r"args.max_steps must be > 0"):
        MixingTrainer(model=model, args=epochs, train_dataset=dataset,
                      callbacks=[MixingCallback(Stratified(3), lambda m: None, group_sizes=[8, 8, 8])])
    with pytest.raises(ValueError, match="callbacks must hold exactly one MixingCallback, got 0"):
        MixingTrainer(model=model, args=args, train_dataset=dataset)
    with pytest.raises(ValueError, match="the training index has 2 groups but the mixer has 3"):
        MixingCallback(Stratified(3), lambda m: None, group_sizes=[8, 8])
    with pytest.raises(ValueError, match="give exactly one of group_sizes and sampler"):
        MixingCallback(Stratified(3), lambda m: None)
    with pytest.raises(ValueError, match=r"group_names must have one name per group \(K=3\), got 2"):
        MixingCallback(Stratified(3), lambda m: None, group_sizes=[8, 8, 8], group_names=["a", "b"])
    used = MixingCallback(Stratified(3), lambda m: None, group_sizes=[8, 8, 8])
    trainer = MixingTrainer(model=model, args=args, train_dataset=dataset, callbacks=[used])
    trainer.train()
    with pytest.raises(ValueError, match="starts at global step 0 but the mixing state is at step 2"):
        trainer.train()
    with pytest.raises(FileNotFoundError, match=f"has no {MIXING_STATE_FILE}"):
        trainer.train(resume_from_checkpoint=str(tmp_path))
    wider = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                              use_cpu=True, disable_tqdm=True)
    other = MixingCallback(Stratified(3), lambda m: None, group_sizes=[8, 8, 8])
    MixingTrainer(model=model, args=wider, train_dataset=dataset, callbacks=[other])
    with pytest.raises(ValueError, match="saved with a global batch of 2 samples per step, this run has 4"):
        other.load_state_dict(used.state_dict())


@needs_hf
@pytest.mark.parametrize("hook, found", [
    (lambda self, epoch_iterator, num_batches: None, r"has get_batch_samples\(epoch_iterator, num_batches\)"),
    (None, "has no such method")])
def test_trainer_without_the_batch_hook_fails_when_built(tmp_path, hook, found):
    """A transformers whose Trainer lacks get_batch_samples(epoch_iterator, num_batches, device), where the
    mixin draws each step's batches, is refused before training, with what it has instead."""
    from aioli_ext.integrations.huggingface import MixingTrainerMixin

    reshaped = type("Reshaped", (Trainer,), {"get_batch_samples": hook})
    mixing = type("MixingReshaped", (MixingTrainerMixin, reshaped), {})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, disable_tqdm=True)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(TypeError, match=r"draws each step's batches in Trainer\.get_batch_samples\(epoch_iterator, "
                                        r"num_batches, device\).*MixingReshaped under transformers [\d.]+ " + found):
        mixing(model=model, args=args, train_dataset=RecordingDataset(_synthetic_groups(8, seed=0)),
               callbacks=[MixingCallback(Stratified(3), lambda m: None, group_sizes=[8, 8, 8])])


def test_importing_the_package_does_not_import_transformers():
    code = ("import sys, aioli_ext, aioli_ext.integrations; "
            "assert 'transformers' not in sys.modules, 'transformers was imported'; "
            "sys.modules['transformers'] = None\n"
            "try:\n"
            "    aioli_ext.integrations.MixingTrainer\n"
            "except ImportError as exc:\n"
            "    print(exc)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True)
    assert "needs transformers (and accelerate): pip install 'aioli_ext[hf]'" in done.stdout

