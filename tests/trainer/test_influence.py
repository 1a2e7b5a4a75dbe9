"""The token-influence view reads the trainer's own weights and shades one span per completion token."""

import html
import json
import re
import shutil
import subprocess

import pytest
import torch
from influence_page import read_influence_html
from transformers import TrainerCallback

from fipo_trl import FIPOConfig, FIPOTrainer
from fipo_trl.tools.influence import TokenInfluenceCallback, batch_context, references_by_prompt
from fipo_trl.tools.tiny import digit_reward, tiny_prompt_dataset


def test_influence_page_shows_the_trainers_weights(tiny_model_path, tmp_path):
    args = FIPOConfig(output_dir=str(tmp_path), bf16=False, per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=8, max_steps=4, learning_rate=1e-2, fipo_updates_per_generation=2,
                      report_to="none", save_strategy="no", gradient_checkpointing=False, disable_tqdm=True)
    trainer = FIPOTrainer(model=tiny_model_path, reward_funcs=digit_reward, args=args,
                          train_dataset=tiny_prompt_dataset(16))
    seen, contexts = {}, {}
    references = references_by_prompt(trainer.train_dataset, None)

    class Snapshot(TokenInfluenceCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen[state.global_step] = {k: v.clone() for k, v in self.trainer.fipo_last_batch.items()}
            contexts[state.global_step] = batch_context(self.trainer, self.trainer.fipo_last_batch, references)
            super().on_step_end(args, state, control, **kwargs)

    view = Snapshot(trainer, every_n_steps=2)
    trainer.add_callback(view)
    trainer.train()

    assert [p.rsplit("/", 1)[1] for p in view.written] == ["step-2.html", "step-4.html"]
    page = (tmp_path / "fipo_influence" / "step-4.html").read_text()
    assert page == (tmp_path / "fipo_influence" / "latest.html").read_text()
    rows = read_influence_html(page)
    batch = seen[4]
    assert len(rows) == batch["completion_ids"].shape[0]
    for row, spans in enumerate(rows):
        mask = batch["mask"][row]
        assert len(spans) == int(mask.sum())  # one span per completion token
        assert [s[0] for s in spans] == batch["weights"][row][mask].tolist()  # the trainer's weights, exactly
        assert [s[1] for s in spans] == batch["future_kl"][row][mask].tolist()
    # Each completion comes with its prompt, its reward and the dataset's reference answer, all recomputed here.
    answers = dict(zip(trainer.train_dataset["prompt"], trainer.train_dataset["answer"]))
    tokenizer = trainer.processing_class
    for row, context in enumerate(contexts[4]):
        completion = tokenizer.decode(batch["completion_ids"][row][batch["mask"][row]], skip_special_tokens=True)
        prompt = tokenizer.decode(batch["prompt_ids"][row][batch["prompt_mask"][row].bool()], skip_special_tokens=True)
        assert context["prompt"] == prompt and prompt in answers
        assert context["reference"] == answers[prompt]
        # TRL keeps rewards as float32: equal to the float64 reward up to one float32 rounding
        assert context["reward"] == pytest.approx(digit_reward([completion], [answers[prompt]])[0], rel=1e-6)
        assert f"reference <b>{answers[prompt]}</b>" in page and f'prompt</span>{prompt}</div>' in page
        assert f"reward {context['reward']:+.3g}" in page
    # The colour scale: f in [1, 1.2] here (the default one-sided clip), so five swatches from 1 to the cap
    swatches = re.findall(r'<span class="swatch" style="background:([^"]+)">([0-9.]+)</span>', page)
    assert [label for _, label in swatches] == ["1.00", "1.05", "1.10", "1.15", "1.20"]
    assert swatches[0][0] == "rgba(0, 0, 0, 0)" and swatches[-1][0] == "rgba(255, 140, 0, 0.850)"
    shaded = [s for spans in rows for s in spans if s[0] > 1]
    assert shaded and all("rgba(255, 140, 0" in s[2] for s in shaded)
    assert all(s[2].endswith("0)") for spans in rows for s in spans if s[0] == 1)


def test_every_n_steps_is_validated(tiny_model_path):
    try:
        TokenInfluenceCallback(trainer=None, every_n_steps=0)
    except ValueError as error:
        assert "`every_n_steps`" in str(error)
    else:
        raise AssertionError("every_n_steps=0 was accepted")


def test_tensorboard_receives_the_page(tiny_model_path, tmp_path):
    args = FIPOConfig(output_dir=str(tmp_path), bf16=False, per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=8, max_steps=2, fipo_updates_per_generation=2, report_to="none",
                      save_strategy="no", gradient_checkpointing=False, disable_tqdm=True)
    trainer = FIPOTrainer(model=tiny_model_path, reward_funcs=digit_reward, args=args,
                          train_dataset=tiny_prompt_dataset(8))

    class Writer:
        def __init__(self):
            self.texts = []

        def add_text(self, tag, text, step):
            self.texts.append((tag, step, text))

    class FakeTensorBoardCallback(TrainerCallback):
        tb_writer = Writer()

    trainer.callback_handler.callbacks.append(FakeTensorBoardCallback())
    view = TokenInfluenceCallback(trainer, every_n_steps=1)
    trainer.add_callback(view)
    trainer.args.report_to = ["tensorboard"]
    trainer.train()
    texts = FakeTensorBoardCallback.tb_writer.texts
    assert [(tag, step) for tag, step, _ in texts] == [("fipo/token_influence", 1), ("fipo/token_influence", 2)]
    assert 'class="tok"' in texts[-1][2]
    assert torch.is_tensor(trainer.fipo_last_batch["weights"])


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Layout facts read back from the rendered page by a script appended to a copy of it (the page itself has none).
_PROBE = """<script>
const swatches = [...document.querySelectorAll('.swatch')].map(s => getComputedStyle(s).backgroundColor);
const tokens = [...document.querySelectorAll('.tok')];
document.body.setAttribute('data-probe', JSON.stringify({
  overflow: document.documentElement.scrollWidth > window.innerWidth,
  swatches: swatches,
  token_lines: new Set(tokens.map(t => Math.round(t.getBoundingClientRect().top))).size,
  shaded: tokens.filter(t => getComputedStyle(t).backgroundColor !== 'rgba(0, 0, 0, 0)').length,
}));
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium) for a real layout")
def test_influence_page_layout_in_headless_chromium(tmp_path):
    from fipo_trl.tools.influence import render_influence_html
    from fipo_trl.tools.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    ids = tokenizer("one 6 = 6 , two 0 = 6 , three 4 = 0 , four 8 = 8 , " * 4 + "the answer is 8 .")["input_ids"]
    T = len(ids)
    weights = torch.linspace(1.0, 1.2, T)[None].repeat(2, 1)
    batch = {"completion_ids": torch.tensor([ids, ids]), "mask": torch.ones(2, T, dtype=torch.bool),
             "weights": weights, "future_kl": weights.log(), "advantages": torch.tensor([1.0, -1.0]),
             "keep": torch.ones(2, dtype=torch.bool)}
    context = [{"prompt": "sum one 6 two 0 ?", "reward": 1.0, "rewards": {"correct": 1.0}, "reference": "8"}] * 2
    page = render_influence_html(batch, tokenizer, step=3, lower=1.0, upper=1.2, context=context)
    probe_page = tmp_path / "page.html"
    probe_page.write_text(page.replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--window-size=800,600", "--virtual-time-budget=2000",
         "--dump-dom", probe_page.as_uri()], capture_output=True, text=True, timeout=120)
    match = re.search(r"data-probe=\"([^\"]*)\"", result.stdout)
    assert match, result.stderr[-2000:]
    probe = json.loads(html.unescape(match.group(1)))
    assert probe["overflow"] is False  # a long completion wraps inside an 800-pixel window (tokens carry no spaces)
    assert probe["token_lines"] >= 4  # two completions of ~85 tokens each take several lines
    assert probe["shaded"] == 2 * (T - 1)  # every token but the first (f = 1) is shaded
    assert probe["swatches"][0] == "rgba(0, 0, 0, 0)" and probe["swatches"][-1] == "rgba(255, 140, 0, 0.85)"
