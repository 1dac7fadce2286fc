"""``python -m data_tools.make_encoders``: small offline text encoders (T5 + CLIP) for tests and the demo.

Nothing pretrained can be downloaded here (DESIGN.md §7), so this tool builds two tiny,
randomly initialised text encoders from configs with a fixed seed and saves them in their
libraries' native formats, to be loaded back only through the real loaders
(``pipeline.encoders``). Same arguments, same weights and tokenizer files.

Output::

    DIR/t5/            T5EncoderModel (config.json, model.safetensors) + T5Tokenizer
                       (tokenizer.json, tokenizer_config.json, spiece.model)
    DIR/clip/          open_clip folder: open_clip_config.json + open_clip_model.safetensors
                       (open_clip's shipped BPE tokenizer, loadable as "local-dir:DIR/clip")
    DIR/encoders.yaml  a TextEncodersConfig pointing at both (absolute paths)

The T5 tokenizer is a SentencePiece unigram model trained here on caption-like sentences
built from ``data_tools.synth``'s vocabulary plus generic English (and the captions of
``--captions FOLDER`` if given). The unigram trainer is seeded with whole words so that
every caption word is one token; other text falls back to characters.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import random
import string
import tempfile
import time
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
import torch
import transformers
from safetensors.torch import save_file

from pipeline.evaluation.synthetic import (
    BACKGROUNDS,
    NOVEL_COLOURS,
    PALETTE,
    POSITIONS,
    SHAPES,
    SIZES,
    caption_for,
    paint_concept,
    sample_scene,
)
from pipeline.config import load_config, save_config

PROG = "data_tools.make_encoders"
TOKENIZER_VOCAB_SIZE = 1000  # upper bound (the trainer may stop below it)
SYNTH_CAPTIONS = 2000  # caption-like sentences in the tokenizer corpus
NOVEL_CAPTIONS = 100  # and as many per novel colour (synthetic.NOVEL_COLOURS)
GENERIC_SENTENCES = 3000  # random sentences of generic English words
FUNCTION_WORDS = ("a", "an", "and", "at", "the", "on", "background")  # the captions' glue words
T5_ARCH = dict(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16,
               feed_forward_proj="gated-gelu", dropout_rate=0.0)  # T5 v1.1 layout, tiny
CLIP_MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 64, "layers": 1, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
GENERIC_WORDS = """
the of and to in is it you that he was for on are with as his they be at one have this from or
had by word but what some we can out other were all there when up use your how said an each she
which do their time if will way about many then them write would like so these her long make
thing see him two has look more day could go come did number sound no most people my over know
water than call first who may down side been now find any new work part take get place made live
where after back little only round man year came show every good me give our under name very
through just form sentence great think say help low line turn cause much mean before move right
boy old too same tell does set three want air well also play small end put home read hand port
large spell add even land here must big high such follow act why ask men change went light kind
off need house picture try us again animal point mother world near build self earth father head
stand own page should country found answer school grow study still learn plant cover food sun
four between state keep eye never last let thought city tree cross farm hard start might story
saw far sea draw left late run while press close night real life few north open seem together
next white children begin got walk example ease paper group always music those both mark often
letter until mile river car feet care second book carry took science eat room friend began idea
fish mountain stop once base hear horse cut sure watch color face wood main enough plain girl
usual young ready above ever red list though feel talk bird soon body dog family direct pose
leave song measure door product black short numeral class wind question happen complete ship
area half rock order fire south problem piece told knew pass since top whole king space heard
best hour better true during hundred five remember step early hold west ground interest reach
fast verb sing listen six table travel less morning ten simple several vowel toward war lay
against pattern slow center love person money serve appear road map rain rule pull cold notice
voice unit power town fine certain fly fall lead cry dark machine note wait plan figure star box
noun field rest correct able pound done beauty drive stood contain front teach week final gave
green quick develop ocean warm free minute strong special mind behind clear tail produce fact
street inch nothing course stay wheel full force blue object decide surface deep moon island
foot system busy test record boat common gold possible plane dry wonder laugh thousand ago ran
check game shape hot miss brought heat snow bring yes distant fill east paint language among
photo image photograph painting drawing render sky cat circle square triangle shapes colour
""".split()


def caption_words() -> list[str]:
    """Every word the synthetic captions use (each should be a single T5 token)."""
    phrases = [*PALETTE, *SHAPES, *SIZES, *POSITIONS, *BACKGROUNDS, *FUNCTION_WORDS]
    return sorted({word for phrase in phrases for word in phrase.split()})


def tokenizer_corpus(seed: int, captions_dir: Path | None = None) -> list[str]:
    """Caption-like sentences, generic English, every ASCII character, and optional captions."""
    rng = random.Random(seed)
    lines = [caption_for(*sample_scene(rng, 0.5)) for _ in range(SYNTH_CAPTIONS)]
    for concept in NOVEL_COLOURS:  # English the text encoder knows, though no training caption uses it
        for _ in range(NOVEL_CAPTIONS):
            background, objects = sample_scene(rng, 0.5)
            paint_concept(objects, concept, 1.0, rng)
            lines.append(caption_for(background, objects))
    for _ in range(GENERIC_SENTENCES):
        words = [rng.choice(GENERIC_WORDS) for _ in range(rng.randint(4, 12))]
        if rng.random() < 0.3:
            words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice(("", ".", ",", "!", "?")))
    lines.append(" ".join(string.ascii_letters + string.digits + string.punctuation))
    if captions_dir is not None:
        for path in sorted(captions_dir.rglob("*.txt")):
            lines.extend(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return lines


def train_sentencepiece(lines: list[str]) -> bytes:
    """A T5-style unigram ``spiece.model`` (pad=0, eos=1, unk=2, no bos), deterministically.

    SentencePiece's default seed pieces split even frequent short words of a small corpus
    ("▁ci r cle"), so the trainer is seeded with every whole word (score: frequency x length).
    """
    counts = collections.Counter(word for line in lines for word in line.split())
    with tempfile.TemporaryDirectory() as tmp:
        seeds = Path(tmp) / "seeds.tsv"
        seeds.write_text("".join(f"\u2581{w}\t{c * len(w)}\n" for w, c in sorted(counts.items())),
                         encoding="utf-8")
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, model_type="unigram",
            vocab_size=TOKENIZER_VOCAB_SIZE, hard_vocab_limit=False, character_coverage=1.0,
            seed_sentencepieces_file=str(seeds), pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
            num_threads=1, shuffle_input_sentence=False, minloglevel=2)
    proto = sentencepiece_model_pb2.ModelProto.FromString(model.getvalue())
    proto.trainer_spec.ClearField("seed_sentencepieces_file")  # a temporary path: not reproducible
    return proto.SerializeToString()


def write_t5(out: Path, seed: int, lines: list[str]) -> None:
    """``out/``: the trained T5 tokenizer and a tiny ``T5EncoderModel`` (safetensors)."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    out.mkdir(parents=True, exist_ok=True)
    spiece = train_sentencepiece(lines)
    with tempfile.TemporaryDirectory() as tmp:  # alone there: no stale tokenizer.json is picked up
        (Path(tmp) / "spiece.model").write_bytes(spiece)
        tokenizer = T5Tokenizer.from_pretrained(tmp, extra_ids=0)  # converts spiece.model
    tokenizer.save_pretrained(out)
    (out / "spiece.model").write_bytes(spiece)
    config = T5Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
                      **T5_ARCH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(config)
    model.save_pretrained(out, safe_serialization=True)


def write_clip(out: Path, seed: int) -> None:
    """``out/``: a tiny open_clip CLIP as ``open_clip_config.json`` + ``open_clip_model.safetensors``."""
    import open_clip

    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**CLIP_MODEL_CFG)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, out / "open_clip_model.safetensors")
    config = {
        "model_cfg": CLIP_MODEL_CFG,
        "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                           "interpolation": "bicubic", "resize_mode": "shortest"},
    }
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def verify(config_path: Path) -> dict:
    """Load the written encoders back through ``pipeline.encoders`` and check what they give."""
    from pipeline.encoders import TextEncoders, TextEncodersConfig

    encoders = TextEncoders(load_config(TextEncodersConfig, config_path))
    split = {w: encoders.t5.tokenizer.tokenize(w) for w in caption_words()}
    split = {w: pieces for w, pieces in split.items() if len(pieces) != 1}
    if split:
        raise RuntimeError(f"caption words that are not one T5 token: {split}")
    out = encoders.encode(["a small red circle at the top left on a navy background", "a cross"])
    shapes = {key: tuple(value.shape) for key, value in out.items()}
    length = shapes["t5_mask"][1]
    if shapes["t5"] != (2, length, encoders.t5.width) or shapes["clip"] != (2, encoders.clip.width):
        raise RuntimeError(f"unexpected encoder output shapes: {shapes}")
    return encoders.describe()


def make_encoders(output: Path, seed: int = 0, captions_dir: Path | None = None) -> dict:
    """Write ``output/{t5,clip,encoders.yaml}`` and return the verified ``describe()``."""
    from pipeline.encoders import ClipEncoderConfig, T5EncoderConfig, TextEncodersConfig

    output = output.resolve()
    write_t5(output / "t5", seed, tokenizer_corpus(seed, captions_dir))
    write_clip(output / "clip", seed)
    cfg = TextEncodersConfig(t5=T5EncoderConfig(path=str(output / "t5")),
                             clip=ClipEncoderConfig(path=str(output / "clip")))
    save_config(cfg, output / "encoders.yaml")
    return verify(output / "encoders.yaml")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, type=Path, help="folder for t5/, clip/ and encoders.yaml")
    p.add_argument("--seed", type=int, default=0, help="weights and tokenizer-corpus seed")
    p.add_argument("--captions", type=Path, default=None, metavar="FOLDER",
                   help="also train the T5 tokenizer on the *.txt captions under FOLDER (e.g. a synth output)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.captions is not None and not args.captions.is_dir():
        parser.error(f"--captions must be a folder, got {args.captions}")
    start = time.perf_counter()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # one summary line instead
    try:
        info = make_encoders(args.output, args.seed, args.captions)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    t5, clip = info["t5"], info["clip"]
    print(f"wrote {args.output.resolve()} in {time.perf_counter() - start:.1f} s: "
          f"t5 width {t5['width']} (vocab {t5['vocab_size']}), "
          f"clip width {clip['width']} (token width {clip['token_width']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
