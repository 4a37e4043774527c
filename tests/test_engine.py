"""The generation engine: per-sequence state, joins, logprobs, stop strings,
structured output and multi-turn reuse.

References: transformers' `generate` (greedy, with a repetition penalty),
our `score()` (for logprobs) and each sequence generated alone.
"""

import functools
import json

import keras
import numpy as np
import pytest

import keras_gemma2
from keras_gemma2 import generation
from keras_gemma2.sampling import SamplingParams
from tests import references
from tests.harness import TestCase
from tests.test_causal_lm import _lm
from tests.test_causal_lm import _prompts


# One model of each kind for the tests that leave it as it is (no
# `compile`, no patched methods), so that they share its compiled prefill
# and steps: on JAX and TensorFlow, tracing and compiling them again for
# every test cost more than the tests themselves.
@functools.lru_cache(maxsize=None)
def _preset_lm():
    return keras_gemma2.Gemma2CausalLM.from_preset("gemma2_tiny_en")


@functools.lru_cache(maxsize=None)
def _shared_lm():
    return _lm()


def _rows(inputs, lengths):
    return [
        inputs["token_ids"][row, :n].tolist() for row, n in enumerate(lengths)
    ]


# Four rows, four settings; prompts of 2 to 9 tokens cross the window of 4
# at different steps.
MIXED = [
    SamplingParams(),
    SamplingParams(temperature=0.9, top_k=5, seed=11),
    SamplingParams(temperature=1.2, min_p=0.1, seed=12),
    SamplingParams(repetition_penalty=1.5),
]


class PerSequenceStateTest(TestCase):
    def test_a_batch_equals_each_sequence_alone(self):
        _, lm = _shared_lm()
        lengths = [2, 9, 5, 3]
        inputs = _prompts(lengths, 9, seed=4)
        together = lm.generate(
            inputs,
            max_new_tokens=12,
            stop_token_ids=None,
            params=MIXED,
            return_details=True,
        )
        for row, length in enumerate(lengths):
            alone = lm.generate(
                {"token_ids": inputs["token_ids"][row : row + 1, :length]},
                max_new_tokens=12,
                stop_token_ids=None,
                params=[MIXED[row]],
                return_details=True,
            )[0]
            self.assertEqual(together[row].token_ids, alone.token_ids)
            np.testing.assert_allclose(
                together[row].logprobs, alone.logprobs, atol=1e-5
            )
        # The sampled rows did sample: not the greedy continuation.
        greedy = lm.generate(
            inputs, max_new_tokens=12, stop_token_ids=None, return_details=True
        )
        self.assertNotEqual(together[1].token_ids, greedy[1].token_ids)

    def test_greedy_rows_match_transformers(self):
        hf, lm = _shared_lm()
        lengths = [2, 9, 5, 3]
        inputs = _prompts(lengths, 9, seed=4)
        results = lm.generate(
            inputs,
            max_new_tokens=10,
            stop_token_ids=None,
            params=MIXED,
            return_details=True,
        )
        prompt = inputs["token_ids"][:1, :2]
        expected = references.hf_greedy(hf, prompt, 10)[0, 2:]
        self.assertEqual(results[0].token_ids, expected.tolist())

    def test_repetition_penalty_matches_transformers_generate(self):
        import torch

        hf, lm = _shared_lm()
        inputs = _prompts([6], 6, seed=9)
        ours = lm.generate(
            inputs,
            max_new_tokens=10,
            stop_token_ids=None,
            repetition_penalty=1.8,
            return_details=True,
        )[0]
        with torch.no_grad():
            theirs = hf.generate(
                torch.as_tensor(inputs["token_ids"], dtype=torch.long),
                max_new_tokens=10,
                do_sample=False,
                repetition_penalty=1.8,
                eos_token_id=None,
                pad_token_id=0,
            )
        self.assertEqual(ours.token_ids, theirs[0, 6:].tolist())

    def test_a_seed_gives_the_same_tokens_each_call(self):
        _, lm = _shared_lm()
        inputs = _prompts([4], 4, seed=1)
        runs = [
            lm.generate(
                inputs,
                max_new_tokens=8,
                stop_token_ids=None,
                temperature=1.0,
                seed=seed,
                return_details=True,
            )[0].token_ids
            for seed in (3, 3, 4)
        ]
        self.assertEqual(runs[0], runs[1])
        self.assertNotEqual(runs[0], runs[2])

    def test_keras_global_seed_repeats_unseeded_sampling(self):
        _, lm = _lm()
        lm.compile(sampler="top_k")
        inputs = _prompts([4], 4, seed=1)
        runs = []
        for seed in (5, 5, 6):
            keras.utils.set_random_seed(seed)
            runs.append(
                lm.generate(inputs, max_new_tokens=8, stop_token_ids=None)
            )
        np.testing.assert_array_equal(
            runs[0]["token_ids"], runs[1]["token_ids"]
        )
        self.assertFalse(
            np.array_equal(runs[0]["token_ids"], runs[2]["token_ids"])
        )

    def test_sequences_join_and_leave_a_running_batch(self):
        # One sequence runs 5 steps, a second joins at a different position,
        # a third takes the row the first leaves: each equals itself alone.
        _, lm = _shared_lm()
        prompts = _rows(_prompts([3, 8, 5], 8, seed=6), [3, 8, 5])

        def sequence(row):
            return generation.Sequence(
                prompts[row], max_new_tokens=9, params=MIXED[row]
            )

        alone = []
        for row in range(3):
            engine = generation.Engine(lm, max_batch=1, max_length=32)
            alone.append(engine.run([sequence(row)])[0].token_ids)
        engine = generation.Engine(lm, max_batch=2, max_length=32)
        first, second, third = sequence(0), sequence(1), sequence(2)
        engine.add([first])
        for _ in range(5):
            engine.step()
        engine.add([second])
        while not first.finished:
            engine.step()
        engine.remove(first)
        engine.add([third])
        self.assertEqual(third.row, 0)
        while engine.running:
            engine.step()
        self.assertEqual(
            [s.result().token_ids for s in (first, second, third)], alone
        )

    @pytest.mark.long
    def test_a_block_of_steps_equals_single_steps(self):
        # `step(num_steps=k)` runs k steps in one compiled loop: the same
        # tokens, logprobs, top logprobs and finish reasons as k single
        # steps, with penalties counted inside the loop, a stop id hit
        # mid-block, a row that joins between blocks, and a cache that a
        # following turn can reuse.
        _, lm = _shared_lm()
        lengths = [2, 9, 5, 3, 4]
        prompts = _rows(_prompts(lengths, 9, seed=7), lengths)
        params = [MIXED[1], MIXED[0], MIXED[3]] + [
            SamplingParams(
                repetition_penalty=1.3, presence_penalty=0.8, top_logprobs=3
            ),
            SamplingParams(frequency_penalty=0.7),
        ]
        params[1] = SamplingParams(top_logprobs=2)
        # The greedy row 1 stops at its first token not seen before in it,
        # past its second: mid-block.
        probe = generation.Engine(lm, max_batch=1, max_length=32)
        greedy = probe.run([generation.Sequence(prompts[1], 12)])[0].token_ids
        where = next(i for i in range(2, 12) if greedy[i] not in greedy[:i])
        stop = greedy[where]

        def sequences():
            return [
                generation.Sequence(
                    prompts[row],
                    max_new_tokens=[12, 15, 11, 13, 9][row],
                    params=params[row],
                    stop_token_ids=[stop] if row == 1 else (),
                )
                for row in range(5)
            ]

        def drive(num_steps):
            engine = generation.Engine(lm, max_batch=5, max_length=32)
            *batch, late = sequences()
            engine.add(batch)
            while not batch[1].finished:
                engine.step(num_steps=num_steps)
            # A new sequence joins between blocks.
            engine.add([late])
            while engine.running:
                engine.step(num_steps=num_steps)
            turns = [s.result() for s in batch + [late]]
            # Second turns continue the stopped row and a full one from
            # their caches, past the window of 4.
            follows = []
            for previous in batch[:2]:
                follows.append(
                    generation.Sequence(
                        previous.ids + [7, 8],
                        max_new_tokens=6,
                        params=SamplingParams(
                            temperature=1.0, top_p=0.9, seed=len(follows)
                        ),
                    )
                )
                engine.add([follows[-1]], reuse=previous)
            while engine.running:
                engine.step(num_steps=num_steps)
            return turns + [s.result() for s in follows]

        blocks, singles = drive(8), drive(1)
        self.assertEqual(blocks[1].finish_reason, "stop")
        self.assertEqual(len(blocks[1].token_ids), where + 1)
        for ours, theirs in zip(blocks, singles):
            self.assertEqual(ours.token_ids, theirs.token_ids)
            self.assertEqual(ours.finish_reason, theirs.finish_reason)
            np.testing.assert_allclose(
                ours.logprobs, theirs.logprobs, atol=1e-5
            )
            self.assertEqual(bool(ours.top_logprobs), bool(theirs.top_logprobs))
            for a, b in zip(ours.top_logprobs or [], theirs.top_logprobs or []):
                self.assertEqual(list(a), list(b))
                np.testing.assert_allclose(
                    list(a.values()), list(b.values()), atol=1e-5
                )

    def test_a_full_engine_refuses_more_sequences(self):
        _, lm = _shared_lm()
        engine = generation.Engine(lm, max_batch=1, max_length=16)
        engine.add([generation.Sequence([2, 5], max_new_tokens=2)])
        with self.assertRaisesRegex(ValueError, "free rows"):
            engine.add([generation.Sequence([2, 5], max_new_tokens=2)])


class DetailsTest(TestCase):
    def test_logprobs_equal_score(self):
        _, lm = _shared_lm()
        lengths = [3, 7]
        inputs = _prompts(lengths, 7, seed=2)
        results = lm.generate(
            inputs,
            max_new_tokens=9,
            stop_token_ids=None,
            temperature=1.0,
            seed=5,
            top_logprobs=3,
            return_details=True,
        )
        for row, length in enumerate(lengths):
            ids = inputs["token_ids"][row, :length].tolist()
            ids += results[row].token_ids
            scores = lm.score(np.asarray([ids], "int32"))[0, length:]
            np.testing.assert_allclose(results[row].logprobs, scores, atol=1e-4)
            logits = keras.ops.convert_to_numpy(
                lm.predict_on_batch(
                    {
                        "token_ids": np.asarray([ids], "int32"),
                        "padding_mask": np.ones((1, len(ids)), "int32"),
                    }
                )
            )[0, length - 1 : -1]
            log_softmax = (
                logits
                - np.log(
                    np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)
                )[:, None]
                - logits.max(-1, keepdims=True)
            )
            for step, top in enumerate(results[row].top_logprobs):
                best = np.argsort(-log_softmax[step])[:3]
                self.assertEqual(list(top), best.tolist())
                np.testing.assert_allclose(
                    list(top.values()), log_softmax[step, best], atol=1e-4
                )

    def test_finish_reasons(self):
        _, lm = _shared_lm()
        inputs = _prompts([4], 4, seed=3)
        free = lm.generate(
            inputs, max_new_tokens=6, stop_token_ids=None, return_details=True
        )[0]
        self.assertEqual(free.finish_reason, "length")
        self.assertEqual(len(free.token_ids), 6)
        # Stop at the third generated token's id.
        stop_id = free.token_ids[2]
        first = free.token_ids.index(stop_id)
        stopped = lm.generate(
            inputs,
            max_new_tokens=6,
            stop_token_ids=(stop_id,),
            return_details=True,
        )[0]
        self.assertEqual(stopped.finish_reason, "stop")
        self.assertEqual(stopped.token_ids, free.token_ids[: first + 1])

    def test_bad_controls_name_their_argument(self):
        _, lm = _shared_lm()
        inputs = _prompts([3], 3)
        cases = [
            ({"temperature": -1.0}, "temperature"),
            ({"top_p": 0.0}, "top_p"),
            ({"top_p": 1.5}, "top_p"),
            ({"min_p": 1.5}, "min_p"),
            ({"top_k": 0}, "top_k"),
            ({"seed": "7"}, "seed"),
            ({"top_logprobs": 21}, "top_logprobs"),
            ({"stop": ["ok", 3]}, "stop"),
            ({"logit_bias": {500: 1.0}}, "logit_bias"),
        ]
        for kwargs, name in cases:
            with self.assertRaisesRegex((ValueError, TypeError), name):
                lm.generate(
                    inputs, max_new_tokens=2, stop_token_ids=None, **kwargs
                )

    def test_beam_search_refuses_engine_options(self):
        _, lm = _lm()
        lm.compile(sampler="beam")
        with self.assertRaisesRegex(ValueError, "BeamSampler"):
            lm.generate(
                _prompts([3], 3),
                max_new_tokens=2,
                stop_token_ids=None,
                temperature=0.5,
            )


class StopStringTest(TestCase):
    def test_a_stop_string_across_three_tokens(self):
        lm = _preset_lm()
        prompt = "The tokenizer"
        free = lm.generate(
            prompt, max_new_tokens=24, stop_token_ids=None, return_details=True
        )
        tokenizer = lm.preprocessor.tokenizer
        ids = free.token_ids
        # A stop string made of generated tokens 6, 7 and 8, cut inside the
        # first and last so that it needs all three.
        piece = generation.detokenize(tokenizer, ids[:9])
        before = generation.detokenize(tokenizer, ids[:6])
        upto = generation.detokenize(tokenizer, ids[:8])
        stop = piece[len(before) - 1 : len(upto) + 1]
        self.assertGreaterEqual(len(stop), 3)
        expected = free.text[: free.text.find(stop)]
        result = lm.generate(
            prompt,
            max_new_tokens=24,
            stop_token_ids=None,
            stop=[stop, "never appears ~~"],
            return_details=True,
        )
        self.assertEqual(result.finish_reason, "stop")
        self.assertNotIn(stop, result.text)
        self.assertEqual(result.text, expected)
        streamed = lm.generate(
            prompt,
            max_new_tokens=24,
            stop_token_ids=None,
            stop=[stop],
            stream=True,
        )
        self.assertEqual("".join(streamed), result.text)

    def test_text_stream_holds_back_a_possible_stop(self):
        tokenizer = _preset_lm().preprocessor.tokenizer
        stream = generation.TextStream(tokenizer, stop=["ab!"])
        ids = [int(i) for i in tokenizer.tokenize("xx ab ab! tail")]
        pieces = [stream.push([i]) for i in ids]
        self.assertEqual("".join(pieces), "xx ab ")
        self.assertTrue(stream.stopped)


class StructuredOutputTest(TestCase):
    SCHEMA = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
        },
        "required": ["name", "age"],
    }

    def test_sampled_json_validates(self):
        lm = _preset_lm()
        results = lm.generate(
            ["A person as JSON:"] * 20,
            max_new_tokens=256,
            temperature=1.0,
            seed=0,
            json_schema=self.SCHEMA,
            return_details=True,
        )
        for result in results:
            self.assertEqual(result.finish_reason, "stop", result.text)
            value = json.loads(result.text)
            self.assertIsInstance(value["name"], str)
            self.assertIsInstance(value["age"], int)

    def test_running_out_of_tokens_is_length(self):
        lm = _preset_lm()
        result = lm.generate(
            "A person as JSON:",
            max_new_tokens=3,
            json_schema=self.SCHEMA,
            return_details=True,
        )
        self.assertEqual(result.finish_reason, "length")

    def test_an_invalid_schema_fails_before_generating(self):
        lm = _preset_lm()
        with self.assertRaisesRegex(ValueError, "json_schema"):
            lm.generate(
                "x", max_new_tokens=3, json_schema={"type": "nosuchtype"}
            )


class MultiTurnTest(TestCase):
    MESSAGES = [
        "Tell me about rivers and the ferries that cross them at night.",
        "Why?",
        "What happens when the water is high after the spring rains?",
        "And in winter?",
        "Thank you, that is all for today.",
    ]

    @pytest.mark.long
    def test_reuse_equals_re_prefilling_every_turn(self):
        lm = _preset_lm()
        session = keras_gemma2.ChatSession(
            lm, max_new_tokens=20, max_length=512, top_logprobs=5
        )
        window = lm.backbone.sliding_window_size
        cached = 0
        for message in self.MESSAGES:
            session.send(message)
            sequence = session._sequence
            # Only this turn's tokens ran: those the cache did not hold.
            self.assertEqual(
                session.prefilled, len(sequence.prompt_ids) - cached
            )
            cached = len(sequence.ids) - 1
            prompt = np.asarray([sequence.prompt_ids], "int32")
            again = lm.generate(
                {"token_ids": prompt},
                max_new_tokens=20,
                top_logprobs=5,
                return_details=True,
            )[0]
            self.assertEqual(sequence.output_ids, again.token_ids)
            np.testing.assert_allclose(
                sequence.logprobs, again.logprobs, atol=1e-4
            )
            for ours, theirs in zip(sequence.top_logprobs, again.top_logprobs):
                self.assertEqual(list(ours), list(theirs))
                np.testing.assert_allclose(
                    list(ours.values()), list(theirs.values()), atol=1e-4
                )
        self.assertGreater(len(session._sequence.ids), 2 * window)
        self.assertEqual(len(session.messages), 10)
        session.reset()
        self.assertIsNone(session.engine.cache)

    def test_reuse_refuses_a_prompt_that_does_not_continue(self):
        _, lm = _shared_lm()
        engine = generation.Engine(lm, max_batch=1, max_length=32)
        first = generation.Sequence([2, 5, 6], max_new_tokens=3)
        engine.add([first])
        while engine.running:
            engine.step()
        with self.assertRaisesRegex(ValueError, "does not continue"):
            engine.add(
                [generation.Sequence([2, 9, 9, 9, 9], max_new_tokens=2)],
                reuse=first,
            )


@pytest.mark.skipif(
    keras.config.backend() == "torch",
    reason="PyTorch runs eagerly: nothing is traced.",
)
class TraceTest(TestCase):
    def test_joining_and_per_row_settings_do_not_retrace_the_step(self):
        _, lm = _lm()
        engine = generation.Engine(lm, max_batch=2, max_length=32)
        traces = []
        step = lm._decode_step

        def counted(*args, **kwargs):
            traces.append(1)
            return step(*args, **kwargs)

        lm._decode_step = counted
        lm._compiled_generation = None
        for seed in range(3):
            engine.add(
                [
                    generation.Sequence(
                        [2, 3 + seed, 4],
                        max_new_tokens=3,
                        params=SamplingParams(temperature=1.0, seed=seed),
                    )
                ]
            )
            while engine.running:
                engine.step()
            for sequence in list(engine.rows):
                if sequence is not None:
                    engine.remove(sequence)
        self.assertEqual(len(traces), 1)
