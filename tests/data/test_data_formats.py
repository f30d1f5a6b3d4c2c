"""Prompt templates and token roles: exact role spans, whole-string equivalence, truncation rules."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from composer_remask.batch import (
    ROLE_ANSWER,
    ROLE_CONTEXT,
    ROLE_RATIONALE,
    ROLE_RESPONSE,
    USER_TAG,
)
from composer_remask.data.formats import (
    DROP_TOO_LONG_ANSWER,
    DROP_TOO_LONG_NO_PREDICTED,
    FIT_KEPT,
    FIT_TRUNCATED,
    ChatExample,
    CoTExample,
    FormatError,
    RoleEncoder,
    encode_example,
    encode_examples,
    fit_to_length,
    format_chat_prompt,
    format_cot_prompt,
)
from composer_remask.data.tokenizer import add_remask_tokens
from composer_remask.tools.fixtures import oasst2_rows, tinycot_rows
from tests.helpers.role_spans import EOS, decoded_spans, expected_chat_spans, expected_cot_spans


def test_cot_roles_decode_to_the_template_pieces(asset_tokenizer):
    example = CoTExample("What is 12 * 7 + 5?", "12 * 7 = 84. 84 + 5 = 89.", "89")
    ids, roles = encode_example(asset_tokenizer, example)
    assert ids.dtype == np.int32 and roles.dtype == np.int8 and len(ids) == len(roles)
    assert decoded_spans(asset_tokenizer, ids, roles) == expected_cot_spans(
        "What is 12 * 7 + 5?", "12 * 7 = 84. 84 + 5 = 89.", "89")
    assert ids[-1] == asset_tokenizer.eos_token_id and roles[-1] == ROLE_ANSWER
    assert ids[0] == asset_tokenizer.convert_tokens_to_ids(USER_TAG)  # no BOS in front
    assert asset_tokenizer.decode(ids.tolist()) == (
        "<|user|>\nWhat is 12 * 7 + 5?\n<|rationale|>\n12 * 7 = 84. 84 + 5 = 89.\n<|answer|>\n89" + EOS)


def test_multi_turn_chat_with_system_keeps_every_assistant_turn_as_response(asset_tokenizer):
    example = ChatExample((("system", "Be brief."), ("user", "What is 2 plus 2?"), ("assistant", "2 + 2 = 4."),
                           ("user", "And times 3?"), ("assistant", "4 * 3 = 12.")))
    ids, roles = encode_example(asset_tokenizer, example)
    assert decoded_spans(asset_tokenizer, ids, roles) == expected_chat_spans(
        [("Be brief.\n\nWhat is 2 plus 2?", "2 + 2 = 4."), ("And times 3?", "4 * 3 = 12.")])
    user_id = asset_tokenizer.convert_tokens_to_ids(USER_TAG)
    user_positions = np.flatnonzero(ids == user_id)
    # The opening <|user|> is context; the one closing the first reply is predicted.
    assert roles[user_positions].tolist() == [ROLE_CONTEXT, ROLE_RESPONSE]
    assert roles[-1] == ROLE_RESPONSE and ids[-1] == asset_tokenizer.eos_token_id
    assert set(roles.tolist()) == {ROLE_CONTEXT, ROLE_RESPONSE}


def test_surrounding_whitespace_is_stripped_and_inner_text_kept(asset_tokenizer):
    example = ChatExample((("user", "  Hello there \n"), ("assistant", "\n Line one\n\nLine two  ")))
    ids, roles = encode_example(asset_tokenizer, example)
    assert decoded_spans(asset_tokenizer, ids, roles) == expected_chat_spans([("Hello there", "Line one\n\nLine two")])


def test_tags_inside_user_text_are_plain_text_not_structure(asset_tokenizer):
    example = ChatExample((("user", f"Say {USER_TAG} and {EOS} literally"), ("assistant", "OK")))
    ids, roles = encode_example(asset_tokenizer, example)
    user_id = asset_tokenizer.convert_tokens_to_ids(USER_TAG)
    assert (ids == user_id).sum() == 1  # only the real opening tag
    assert (ids == asset_tokenizer.eos_token_id).sum() == 1  # only the real closing EOS
    assert decoded_spans(asset_tokenizer, ids, roles)[0] == (
        "context", f"<|user|>\nSay {USER_TAG} and {EOS} literally\n<|assistant|>\n")


@pytest.mark.parametrize("which", ["asset", "conftest"])
def test_piecewise_ids_equal_whole_string_ids(which, asset_tokenizer, tiny_tokenizer):
    """The model trains on the ids a whole-string prompt would give at inference."""
    tokenizer = asset_tokenizer if which == "asset" else tiny_tokenizer
    encoder = RoleEncoder(tokenizer)
    examples = [CoTExample(r["prompt"], r["rationale"], r["target"]) for r in tinycot_rows(30, seed=3)]
    examples += [ChatExample(tuple((t["role"], t["content"]) for t in r["messages"])) for r in oasst2_rows(30, seed=3)]
    for example in examples:
        assert encoder.encode(example)[0].tolist() == encoder.encode_whole_string(example)


def test_batched_encoding_equals_one_by_one_and_survives_pickling(asset_tokenizer):
    examples = [CoTExample(r["prompt"], r["rationale"], r["target"]) for r in tinycot_rows(10, seed=1)]
    batched = encode_examples(asset_tokenizer, examples)
    encoder = pickle.loads(pickle.dumps(RoleEncoder(asset_tokenizer)))
    for example, (ids, roles) in zip(examples, batched):
        single_ids, single_roles = encode_example(asset_tokenizer, example)
        assert np.array_equal(ids, single_ids) and np.array_equal(roles, single_roles)
        pickled_ids, pickled_roles = encoder.encode(example)
        assert np.array_equal(ids, pickled_ids) and np.array_equal(roles, pickled_roles)


def test_encoder_needs_the_tags_which_add_remask_tokens_provides():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(["hello world"] * 3, trainers.BpeTrainer(
        vocab_size=270, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    bare = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS)
    with pytest.raises(ValueError, match="add_remask_tokens"):
        RoleEncoder(bare)
    add_remask_tokens(bare)
    ids, roles = RoleEncoder(bare).encode(ChatExample((("user", "hello"), ("assistant", "world"))))
    assert decoded_spans(bare, ids, roles) == expected_chat_spans([("hello", "world")])


@pytest.mark.parametrize(("turns", "reason", "turn"), [
    ((("user", "hi"),), "last_turn_not_assistant", 0),
    ((("assistant", "hi"),), "bad_turn_order", 0),
    ((("user", "a"), ("assistant", "b"), ("assistant", "c")), "bad_turn_order", 2),
    ((("user", "a"), ("bot", "b")), "unknown_role", 1),
    ((("user", " \n "), ("assistant", "b")), "empty_text", 0),
])
def test_invalid_chats_raise_with_reason_and_turn(asset_tokenizer, turns, reason, turn):
    with pytest.raises(FormatError) as info:
        encode_example(asset_tokenizer, ChatExample(turns))
    assert info.value.reason == reason and info.value.turn == turn


def test_generation_prompts_are_prefixes_of_the_training_text(asset_tokenizer):
    cot = CoTExample("What is 3 + 4?", "3 + 4 = 7.", "7")
    ids, _ = encode_example(asset_tokenizer, cot)
    assert asset_tokenizer.decode(ids.tolist()).startswith(format_cot_prompt("What is 3 + 4?"))
    turns = (("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye"))
    prompt = format_chat_prompt(turns)
    assert prompt == "<|user|>\nBe brief.\n\nHi\n<|assistant|>\nHello!\n<|user|>\nBye\n<|assistant|>\n"
    full, _ = encode_example(asset_tokenizer, ChatExample((*turns, ("assistant", "Goodbye!"))))
    assert asset_tokenizer.decode(full.tolist()).startswith(prompt)


def _encoded(roles: list[int]) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(100, 100 + len(roles), dtype=np.int32), np.array(roles, dtype=np.int8)


def test_fit_keeps_short_examples_untouched():
    ids, roles = _encoded([0, 0, 1, 1])
    out_ids, out_roles, outcome = fit_to_length(ids, roles, 4)
    assert outcome == FIT_KEPT and out_ids is ids and out_roles is roles


def test_fit_truncates_the_predicted_part_from_the_end_and_drops_dangling_context():
    C, R = ROLE_CONTEXT, ROLE_RESPONSE
    ids, roles = _encoded([C, C, R, R, R, C, C, C, R, R])
    out_ids, out_roles, outcome = fit_to_length(ids, roles, 4)
    assert outcome == FIT_TRUNCATED and out_roles.tolist() == [C, C, R, R] and out_ids.tolist() == [100, 101, 102, 103]
    # A cut inside the second user turn keeps the first reply and nothing of the dangling context.
    out_ids, out_roles, outcome = fit_to_length(ids, roles, 7)
    assert outcome == FIT_TRUNCATED and out_roles.tolist() == [C, C, R, R, R]


def test_fit_drops_examples_with_no_predicted_token_left_or_a_cut_answer():
    C, T, A = ROLE_CONTEXT, ROLE_RATIONALE, ROLE_ANSWER
    ids, roles = _encoded([C, C, C, C, ROLE_RESPONSE])
    assert fit_to_length(ids, roles, 3)[2] == DROP_TOO_LONG_NO_PREDICTED
    ids, roles = _encoded([C, T, T, T, A, A])
    out_ids, _, outcome = fit_to_length(ids, roles, 5)
    assert outcome == DROP_TOO_LONG_ANSWER and len(out_ids) == 0
    assert fit_to_length(ids, roles, 6)[2] == FIT_KEPT
