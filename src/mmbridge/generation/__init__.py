"""Generation: batched / streaming answers, chat sessions with KV reuse, heads decoded into typed parts."""

from mmbridge.generation.parts import (
    DetectionsPart,
    HeadPart,
    ImagePart,
    KeypointsPart,
    OutputPart,
    TextPart,
    part_to_dict,
    part_to_text,
    register_part,
)
from mmbridge.generation.pipeline import (
    ChatSession,
    GenerationResult,
    MMBridgePipeline,
    SamplingOptions,
    StopStringFilter,
)

__all__ = ["ChatSession", "DetectionsPart", "GenerationResult", "HeadPart", "ImagePart", "KeypointsPart",
           "MMBridgePipeline", "OutputPart", "SamplingOptions", "StopStringFilter", "TextPart", "part_to_dict",
           "part_to_text", "register_part"]
