"""LoRA networks on tiny random encoder (BERT) and decoder (GPT-2) backbones, built offline."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from bench.errors import BenchError
from bench.tasks.base import TrainRecipe
from bench.tasks.lora_model import PAD, LoraSpec, TokenPooling, shared_backbone, special_affixes, tokenize
from bench.training import load_state, save_state, train

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FLAVOURS = ["encoder", "decoder"]


def _fixture_module():
    spec = importlib.util.spec_from_file_location("tiny_text_backbone", FIXTURES / "tiny_text_backbone.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def backbones(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    fixture = _fixture_module()
    return {"encoder": str(fixture.build_tiny_backbone(tmp_path_factory.mktemp("tiny-bert"))),
            "decoder": str(fixture.build_tiny_decoder(tmp_path_factory.mktemp("tiny-gpt2")))}


def _network(path: str, seed: int, rank: int = 2, pooling: TokenPooling = TokenPooling.AUTO):
    torch.manual_seed(seed)
    return shared_backbone(path).build(2, LoraSpec(rank=rank, alpha=4.0), pooling, dropout=0.1).eval()


def _words(n: int) -> str:
    return " ".join(_fixture_module().WORDS[:n])


@pytest.mark.parametrize("head_tail", [True, False])
def test_tokenize_keeps_head_and_tail_with_special_tokens(backbones, head_tail):
    tok = shared_backbone(backbones["encoder"]).tokenizer
    words = _fixture_module().WORDS[:30]
    ids = tokenize(tok, [" ".join(words), "great"], max_length=12, head_tail=head_tail)
    cls, sep = tok.convert_tokens_to_ids(["[CLS]", "[SEP]"])
    expect = words[:5] + words[-5:] if head_tail else words[:10]
    assert ids[0].tolist() == [cls, *tok.convert_tokens_to_ids(expect), sep]
    assert ids[1].tolist() == [cls, tok.convert_tokens_to_ids("great"), sep] + [PAD] * 9


def test_decoder_tokenizer_adds_no_special_tokens(backbones):
    tok = shared_backbone(backbones["decoder"]).tokenizer
    assert special_affixes(tok) == ([], [])
    ids = tokenize(tok, ["good movie", "bad"], max_length=8, head_tail=True)
    assert ids.tolist() == [tok.convert_tokens_to_ids(["good", "movie"]), [tok.convert_tokens_to_ids("bad"), PAD]]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_networks_share_the_frozen_backbone_and_train_adapters_and_head(backbones, flavour):
    a, b = _network(backbones[flavour], 0), _network(backbones[flavour], 1)
    trainable = [n for n, p in a.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    assert any("lora_A" in n for n in trainable) and "head.weight" in trainable
    frozen_a = {n: p for n, p in a.named_parameters() if not p.requires_grad}
    frozen_b = {n: p for n, p in b.named_parameters() if not p.requires_grad}
    assert frozen_a.keys() == frozen_b.keys() and len(frozen_a) > 10
    assert all(frozen_a[n].data_ptr() == frozen_b[n].data_ptr() for n in frozen_a)  # one copy in memory
    lora_a = [n for n in trainable if "lora_A" in n][0]
    assert not torch.equal(dict(a.named_parameters())[lora_a], dict(b.named_parameters())[lora_a])


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_padding_does_not_change_the_logits(backbones, flavour):
    model = _network(backbones[flavour], 0)
    tok = shared_backbone(backbones[flavour]).tokenizer
    x = tokenize(tok, [_words(7), "good movie"], max_length=16, head_tail=True)
    padded = torch.cat([x, torch.full((2, 5), PAD)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(padded), rtol=1e-5, atol=1e-5)


def test_decoder_reads_the_last_token_and_refuses_mean_pooling(backbones):
    assert _network(backbones["decoder"], 0).pooling is TokenPooling.LAST
    assert _network(backbones["encoder"], 0).pooling is TokenPooling.MEAN
    with pytest.raises(BenchError, match="pooling=last"):
        _network(backbones["decoder"], 0, pooling=TokenPooling.MEAN)


def test_bad_target_modules_and_missing_backbone_are_one_line_errors(backbones, tmp_path):
    with pytest.raises(BenchError, match="target_modules"):
        shared_backbone(backbones["encoder"]).build(2, LoraSpec(target_modules=("nope",)), TokenPooling.AUTO, 0.1)
    with pytest.raises(BenchError, match="cannot load backbone"):
        shared_backbone(str(tmp_path))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_training_moves_adapters_and_head_only_and_the_checkpoint_holds_only_them(backbones, flavour, tmp_path):
    model = _network(backbones[flavour], 0)
    tok = shared_backbone(backbones[flavour]).tokenizer
    words = _fixture_module().WORDS
    texts = [" ".join(words[i : i + 6]) for i in range(40)]
    data = TensorDataset(tokenize(tok, texts, 16, True), torch.arange(40) % 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    recipe = TrainRecipe(epochs=2, batch_size=8, lr=1e-2, weight_decay=0.0)
    train(model, data, recipe, torch.device("cpu"), torch.Generator().manual_seed(0), lambda it, **k: it)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {n for n, p in model.named_parameters() if p.requires_grad}
    save_state(model, tmp_path / "net.pt")
    stored = torch.load(tmp_path / "net.pt", weights_only=True)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert set(stored) == set(model.state_dict()) - frozen and frozen
    fresh = _network(backbones[flavour], 5)
    assert load_state(fresh, tmp_path / "net.pt")
    with torch.no_grad():
        torch.testing.assert_close(fresh(data.tensors[0]), model.eval()(data.tensors[0]))
