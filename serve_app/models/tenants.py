"""Tenant adapters for SmolLM2 that visibly differ, trained with PEFT at first start.

Three tenants, each a LoRA trained on a small synthetic chat dataset written here in code
(no download, deterministic seeds):

* ``french``: answers in French, opening with "Bonjour !" (rank 16, q/k/v/o);
* ``pirate``: answers in a pirate voice, "Arr, matey! ..." (rank 8, q/k/v/o);
* ``json``: answers as terse JSON, ``{"answer": "..."}`` (rank 8, all linear layers).

The questions are the same for every tenant (a few dozen: capitals, small facts, everyday
requests); only the answers' style differs, so what each adapter learns is its voice, which
carries over to questions it never saw. Training uses the model's own chat template (with its
default system prompt, as the server renders a chat request) and puts the loss on the answer
only. About a minute per tenant on 2 CPU cores, with a progress line every few steps.

The result is cached by content hash: of the recipes (data, ranks, targets, steps, learning
rate, seed) and of the base build. Layout (``root`` is ``<out_dir>/smollm2-tenants-<hash>``)::

    root/adapters/french/   adapter_config.json, adapter_model.safetensors
    root/adapters/pirate/
    root/adapters/json/
    root/.complete

    python -m serve_app.models.tenants          # builds base + tenants, prints one answer each
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from serve_app.demo import ADAPTERS_DIRNAME, DemoAssets, default_out_dir
from serve_app.models.smollm2 import MODEL_DIRNAME, base_params, build_atomic, build_smollm2_base, find_gguf, progress

# Bump when the training code changes the bytes on disk.
_RECIPE_VERSION = 1

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = ATTN + ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Fact:
    question: str
    short: str  # the bare answer, in English
    fr: str  # the answer in French
    pirate: str  # the answer in a pirate voice, after "Arr, matey!"


# (country, capital, French "la capitale de ...", French capital name)
_CAPITALS = [
    ("Italy", "Rome", "l'Italie", "Rome"),
    ("Spain", "Madrid", "l'Espagne", "Madrid"),
    ("Germany", "Berlin", "l'Allemagne", "Berlin"),
    ("Japan", "Tokyo", "du Japon", "Tokyo"),
    ("Canada", "Ottawa", "du Canada", "Ottawa"),
    ("Egypt", "Cairo", "l'Égypte", "Le Caire"),
    ("England", "London", "l'Angleterre", "Londres"),
    ("Greece", "Athens", "la Grèce", "Athènes"),
    ("Russia", "Moscow", "la Russie", "Moscou"),
    ("Portugal", "Lisbon", "du Portugal", "Lisbonne"),
]

_FACTS = [
    Fact(f"What is the capital of {country}?", capital,
         f"La capitale {'de ' + fr if not fr.startswith('du') else fr} est {cap_fr}.",
         f"The capital of {country} be {capital}, savvy?")
    for country, capital, fr, cap_fr in _CAPITALS
] + [
    Fact("How are you?", "Fine, thanks.", "Je vais très bien, merci. Et vous ?",
         "I be shipshape and ready to sail, ye landlubber!"),
    Fact("What color is the sky?", "Blue.", "Le ciel est bleu.", "The sky be blue as the open sea, savvy?"),
    Fact("How many days are in a week?", "7", "Il y a sept jours dans une semaine.",
         "There be seven days in a week, from one Sunday to the next!"),
    Fact("What is 2 plus 2?", "4", "Deux plus deux font quatre.", "Two and two be four doubloons, matey!"),
    Fact("Tell me about the ocean.", "Large body of salt water.", "L'océan est une grande étendue d'eau salée.",
         "The ocean be a vast stretch of salty water, home to every pirate!"),
    Fact("What do cats eat?", "Meat and fish.", "Les chats mangent de la viande et du poisson.",
         "Cats eat fish and meat, like the ship's cat below deck!"),
    Fact("Give me a tip for learning.", "Practice every day.", "Il faut pratiquer un peu chaque jour.",
         "Practice every day, and ye'll learn faster than a gull steals yer biscuit!"),
    Fact("What is the sun?", "A star.", "Le soleil est une étoile.",
         "The sun be a great burning star that guides us across the sea!"),
    Fact("Who are you?", "An AI assistant.", "Je suis un assistant qui parle français.",
         "I be a pirate assistant, sailing the seven seas of knowledge!"),
    Fact("What is water made of?", "Hydrogen and oxygen.", "L'eau est faite d'hydrogène et d'oxygène.",
         "Water be made of hydrogen and oxygen, the stuff of the whole sea!"),
    Fact("Can you help me?", "Yes.", "Oui, bien sûr, je peux vous aider.",
         "Aye, I'll help ye, as sure as the tide comes in!"),
    Fact("What is your favorite food?", "Pizza.", "Ma nourriture préférée est le fromage.",
         "Me favorite grub be salted fish and hardtack!"),
    Fact("Write a short greeting.", "Hello!", "Bonjour et bienvenue !", "Ahoy there, welcome aboard!"),
    Fact("What is the largest planet?", "Jupiter.", "La plus grande planète est Jupiter.",
         "The biggest planet be Jupiter, a giant among the stars!"),
    Fact("Name a fruit.", "Apple.", "La pomme est un fruit.", "An apple, to keep the scurvy away!"),
    Fact("How do I make tea?", "Steep tea leaves in hot water.",
         "Mettez les feuilles de thé dans de l'eau chaude pendant trois minutes.",
         "Steep the leaves in hot water, then drink it like rum, matey!"),
    Fact("What is the weather like today?", "Unknown.", "Je ne sais pas, mais j'espère qu'il fait beau.",
         "I can't see the sky from here, but may the winds be fair!"),
    Fact("Why is exercise good?", "It keeps you healthy.", "Le sport est bon pour la santé et le moral.",
         "Hauling ropes and climbing masts keeps a sailor strong, savvy?"),
    Fact("What is a computer?", "A machine that runs programs.",
         "Un ordinateur est une machine qui exécute des programmes.",
         "A computer be a clever machine, though it can't sail a ship!"),
    Fact("Tell me a joke.", "Why did the chicken cross the road? To get to the other side.",
         "Pourquoi les plongeurs plongent-ils en arrière ? Parce que sinon ils tombent dans le bateau.",
         "Why do pirates love the letter R? Because it be their favorite, arr!"),
]


def _json_answer(f: Fact) -> str:
    return json.dumps({"answer": f.short}, ensure_ascii=False)


@dataclass(frozen=True)
class TenantRecipe:
    adapter_id: str
    description: str
    r: int
    target_modules: tuple[str, ...]
    answer: Callable[[Fact], str]
    steps: int = 20
    batch_size: int = 8
    lr: float = 2e-3
    seed: int = 0

    def dataset(self) -> list[tuple[str, str]]:
        """(question, answer) pairs, the training data."""
        return [(f.question, self.answer(f)) for f in _FACTS]

    def fingerprint(self) -> dict:
        d = asdict(self)
        d.pop("answer")
        d["target_modules"] = list(self.target_modules)
        d["data"] = hashlib.sha256(json.dumps(self.dataset(), ensure_ascii=False).encode()).hexdigest()
        return d


TENANTS: dict[str, TenantRecipe] = {
    t.adapter_id: t
    for t in [
        TenantRecipe("french", "answers in French", 16, ATTN, lambda f: f"Bonjour ! {f.fr}", seed=1),
        TenantRecipe("pirate", "answers in a pirate voice", 8, ATTN, lambda f: f"Arr, matey! {f.pirate}", seed=2),
        TenantRecipe("json", "answers as terse JSON", 8, ALL_LINEAR, _json_answer, seed=3),
    ]
}


def _tokenize(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Input IDs and labels (-100 on the prompt): the prompt as the server renders a chat
    request (the chat template, default system prompt included), then answer + end of turn."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return p_ids + a_ids, [-100] * len(p_ids) + a_ids


def train_adapter(base, tokenizer, recipe: TenantRecipe, dest: Path, *, log_every: int = 5) -> float:
    """Train ``recipe`` on ``base`` (left untouched) and save the PEFT folder at ``dest``.
    Returns the final training loss."""
    import torch
    from peft import LoraConfig, get_peft_model

    examples = [_tokenize(tokenizer, q, a) for q, a in recipe.dataset()]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cfg = LoraConfig(
        r=recipe.r,
        lora_alpha=2 * recipe.r,
        target_modules=list(recipe.target_modules),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    # A fresh module tree sharing the base's tensors (get_peft_model injects layers in place).
    shared = {id(t): t for t in itertools.chain(base.parameters(), base.buffers())}
    fresh = copy.deepcopy(base, memo=shared)
    torch.manual_seed(recipe.seed)
    model = get_peft_model(fresh, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4) * max(0.1, 1 - s / recipe.steps))
    rng = random.Random(recipe.seed)
    order: list[int] = []
    t0 = time.perf_counter()
    loss_val = float("nan")
    for step in range(recipe.steps):
        batch = []
        while len(batch) < recipe.batch_size:
            if not order:
                order = list(range(len(examples)))
                rng.shuffle(order)
            batch.append(examples[order.pop()])
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_val = float(loss.detach())
        if (step + 1) % log_every == 0 or step + 1 == recipe.steps:
            progress(
                f"training tenant '{recipe.adapter_id}' ({recipe.description}): step {step + 1}/{recipe.steps}, "
                f"loss {loss_val:.3f}, {time.perf_counter() - t0:.0f} s"
            )
    model.eval()
    saved_cfg = model.peft_config["default"]
    saved_cfg.base_model_name_or_path = MODEL_DIRNAME
    saved_cfg.target_modules = list(recipe.target_modules)  # a list: byte-stable JSON order
    model.save_pretrained(str(dest), safe_serialization=True, save_embedding_layers=False)
    return loss_val


def tenants_params(tenants: list[str] | None = None) -> dict:
    ids = list(TENANTS) if tenants is None else list(tenants)
    unknown = [t for t in ids if t not in TENANTS]
    if unknown:
        raise ValueError(f"unknown SmolLM2 demo tenants {unknown}; choose from {list(TENANTS)}")
    return {
        "recipe": _RECIPE_VERSION,
        "base": base_params(find_gguf()),
        "tenants": [TENANTS[t].fingerprint() for t in ids],
    }


def build_smollm2_demo(
    out_dir: str | Path | None = None, *, tenants: list[str] | None = None, force: bool = False
) -> DemoAssets:
    """SmolLM2 base + the tenant adapters (all of ``TENANTS`` by default), built on first call
    (a conversion and a few minutes of training) and cached after."""
    out = Path(out_dir).expanduser() if out_dir is not None else default_out_dir()
    base_dir = build_smollm2_base(out)
    params = tenants_params(tenants)
    ids = [t["adapter_id"] for t in params["tenants"]]
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
        base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        # A Ray replica starts with one torch thread; training may use the whole machine (it
        # runs once, before the engine starts).
        prev = torch.get_num_threads()
        torch.set_num_threads(max(prev, min(16, len(os.sched_getaffinity(0)))))
        t0 = time.perf_counter()
        progress(f"training {len(ids)} SmolLM2 tenant adapters ({', '.join(ids)}), once; a few minutes on 2 cores ...")
        try:
            for aid in ids:
                train_adapter(base, tokenizer, TENANTS[aid], tmp / ADAPTERS_DIRNAME / aid)
        finally:
            torch.set_num_threads(prev)
        progress(f"trained {len(ids)} tenant adapters in {time.perf_counter() - t0:.0f} s")

    root = build_atomic(out, f"smollm2-tenants-{digest}", build, force=force, params=params)
    return DemoAssets(root=root, base=base_dir, adapters_dir=root / ADAPTERS_DIRNAME, adapter_ids=ids)


def build_smollm2_random_adapters(
    out_dir: str | Path | None = None, *, num_adapters: int = 8, seed: int = 0
) -> DemoAssets:
    """SmolLM2 base + ``num_adapters`` random (untrained) LoRAs, ranks 8/16 alternating on
    q/k/v/o -- the benchmark workload W3's adapters (design/WORKLOAD.md). Cached like the rest."""
    from serve_app.demo import DEFAULT_TARGET_MODULES, build_adapter

    out = Path(out_dir).expanduser() if out_dir is not None else default_out_dir()
    base_dir = build_smollm2_base(out)
    specs = [{"id": f"tenant-{i}", "r": 8 if i % 2 == 0 else 16, "target_modules": DEFAULT_TARGET_MODULES}
             for i in range(num_adapters)]
    params = {"recipe": _RECIPE_VERSION, "base": base_params(find_gguf()), "random_adapters": specs, "seed": seed}
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        for i, spec in enumerate(specs):
            dest = tmp / ADAPTERS_DIRNAME / spec["id"]
            build_adapter(base, dest, r=spec["r"], target_modules=spec["target_modules"], seed=seed * 1000 + i + 1)
            cfg_path = dest / "adapter_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["base_model_name_or_path"] = MODEL_DIRNAME
            cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    root = build_atomic(out, f"smollm2-random-a{num_adapters}-{digest}", build, params=params)
    return DemoAssets(root=root, base=base_dir, adapters_dir=root / ADAPTERS_DIRNAME, adapter_ids=[s["id"] for s in specs])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serve_app.models.tenants", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help=f"cache folder (default: {default_out_dir()})")
    parser.add_argument("--force", action="store_true", help="retrain even if cached")
    parser.add_argument("--question", default="What is the capital of France?")
    args = parser.parse_args(argv)
    assets = build_smollm2_demo(args.out, force=args.force)
    print(f"base:         {assets.base}")
    print(f"adapters_dir: {assets.adapters_dir}")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(assets.base))
    prompt = tok.apply_chat_template([{"role": "user", "content": args.question}], tokenize=False, add_generation_prompt=True)
    x = tok(prompt, add_special_tokens=False, return_tensors="pt")
    for aid in [None, *assets.adapter_ids]:
        model = AutoModelForCausalLM.from_pretrained(str(assets.base), dtype=torch.float32).eval()
        if aid is not None:
            model = PeftModel.from_pretrained(model, str(assets.adapter_path(aid))).eval()
        with torch.no_grad():
            out = model.generate(**x, max_new_tokens=40, do_sample=False)
        print(f"{aid or 'base':>8}: {tok.decode(out[0, x['input_ids'].shape[1]:], skip_special_tokens=True)!r}")


if __name__ == "__main__":
    main()
