"""End-to-end demo (`make demo`): offline data -> tokenizer -> a multi-stage omni recipe on the
tiny model -> a spoken-out answer about an image (sentence-wise streaming to espeak-ng) ->
export of the LLM to Hugging Face format -> parity check in transformers.

  python -m omni_jax.cli.demo --workdir runs/demo [--recipe ola] [--steps 80]

Everything is local: digit images from scikit-learn, speech from espeak-ng (tones if it is
missing), a SentencePiece tokenizer trained on the fixture text. Re-running resumes/skips
finished stages. A summary is written to WORKDIR/demo_summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _prepare_data(data_dir: str, vocab_size: int) -> tuple[dict[str, str], str]:
    from omni_jax.data.fixtures import make_fixtures, train_fixture_tokenizer

    manifests = make_fixtures(data_dir, seed=0)
    return manifests, train_fixture_tokenizer(manifests, vocab_size,
                                              os.path.join(data_dir, "spm"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m omni_jax.cli.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="runs/demo")
    ap.add_argument("--recipe", default="ola", help="ola | capybara | openomni | ovis | xvila")
    ap.add_argument("--steps", type=int, default=80, help="training steps per stage")
    ap.add_argument("--lr", type=float, default=1e-2, help="peak learning rate of every stage")
    args = ap.parse_args(argv)
    if args.steps <= 0:
        print("error: --steps must be positive", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import jax
    import numpy as np

    from omni_jax.cli import check_logits
    from omni_jax.cli.chat import run_chat
    from omni_jax.convert.qwen2 import export_qwen2
    from omni_jax.omni_config import OmniConfig
    from omni_jax.recipes import final_params, load_recipe, make_plan, run
    from omni_jax.train.omni_model import OmniLM

    t0 = time.time()
    workdir = os.path.abspath(args.workdir)
    data_dir = os.path.join(workdir, "data")
    try:
        config = load_recipe(f"{args.recipe}:model=tiny")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[1/5] fixture data and tokenizer -> {data_dir}")
    manifests, spm = _prepare_data(data_dir, config.model.llm.vocab_size)
    for name, path in manifests.items():
        with open(path) as f:
            print(f"      {name}: {sum(1 for _ in f)} records")
    config.data_root, config.tokenizer.path = data_dir, spm
    config.train.progress_bar = False
    config.train.log_every = max(1, args.steps // 5)
    for name in config.stage_order:
        config.stages[name].steps = args.steps
        config.stages[name].optim.lr = args.lr
    print(f"[2/5] recipe {config.recipe} on the tiny model: stages {list(config.stage_order)}")
    lines: list[str] = []

    def echo(line: str) -> None:
        lines.append(line)
        print("      " + line.replace("\n", "\n      "))

    status = run(config, os.path.join(workdir, "train"), echo=echo)
    model = OmniLM(OmniConfig.from_dict(config.model.to_dict()))
    plans = make_plan(config, model, count_data=False)
    params = final_params(os.path.join(workdir, "train"), plans[-1], model)
    with open(manifests["image_qa"]) as f:
        record = json.loads(f.readline())
    image = os.path.join(data_dir, record["images"][0])
    question = record["messages"][0]["content"][-1]["text"]
    truth = record["messages"][1]["content"]
    print(f"[3/5] ask the trained model about {os.path.relpath(image, workdir)}: {question!r} "
          f"(reference answer {truth!r}); sentences stream to {workdir}/speech")
    answer = run_chat(config, os.path.join(workdir, "train"), question, images=[image],
                      max_new_tokens=32, stream=True, speak_dir=os.path.join(workdir, "speech"),
                      echo=lambda s: print(f"      > {s}"))
    hf_dir = os.path.join(workdir, "hf_llm")
    print(f"[4/5] export the trained LLM to Hugging Face format -> {hf_dir}")
    export_qwen2(model.config.llm, {"params": jax.device_get(params["llm"])}, hf_dir)
    print("[5/5] transformers vs omni_jax on the exported checkpoint:")
    rc = check_logits.main(["--hf", hf_dir, "--seq", "16"])
    losses = [ln for ln in lines if ": loss " in ln]
    summary = {"recipe": config.recipe, "stages": status, "losses": losses,
               "question": question, "reference": truth, "answer": answer,
               "parity_ok": rc == 0, "seconds": round(time.time() - t0, 1),
               "num_params": int(sum(np.size(x) for x in jax.tree.leaves(params)))}
    chat = (f"python -m omni_jax.cli.chat --workdir {workdir}/train --prompt "
            f"'{question}' --image {image} --stream --speak_dir {workdir}/speech")
    summary["chat_command"] = chat
    print(f"chat with the trained model:\n  {chat}")
    with open(os.path.join(workdir, "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"done in {summary['seconds']} s: {summary['num_params']:,} parameters, "
          f"parity {'OK' if rc == 0 else 'FAILED'}; summary in {workdir}/demo_summary.json")
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
