from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "codec", "data", "scales", "block_size", "outlier_index", "outlier_values")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    OUTLIER_INDEX_FIELD_NUMBER: _ClassVar[int]
    OUTLIER_VALUES_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    codec: str
    data: bytes
    scales: bytes
    block_size: int
    outlier_index: bytes
    outlier_values: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., codec: _Optional[str] = ..., data: _Optional[bytes] = ..., scales: _Optional[bytes] = ..., block_size: _Optional[int] = ..., outlier_index: _Optional[bytes] = ..., outlier_values: _Optional[bytes] = ...) -> None: ...

class Span(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("payload", "last")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    last: bool
    def __init__(self, payload: _Optional[bytes] = ..., last: _Optional[bool] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("kind", "message")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        INTERNAL: _ClassVar[Error.Kind]
        INVALID_REQUEST: _ClassVar[Error.Kind]
        CACHE_FULL: _ClassVar[Error.Kind]
        SPAN_NOT_SERVED: _ClassVar[Error.Kind]
    INTERNAL: Error.Kind
    INVALID_REQUEST: Error.Kind
    CACHE_FULL: Error.Kind
    SPAN_NOT_SERVED: Error.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    kind: Error.Kind
    message: str
    def __init__(self, kind: _Optional[_Union[Error.Kind, str]] = ..., message: _Optional[str] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("version", "dht_prefix", "span", "hidden_size", "torch_dtype", "cache_tokens_left", "codecs", "max_batch_size", "max_tokens_per_request", "max_session_length", "max_lora_rank", "served", "max_sessions_per_peer", "max_requests_per_peer", "max_session_lifetime")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DHT_PREFIX_FIELD_NUMBER: _ClassVar[int]
    SPAN_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    TORCH_DTYPE_FIELD_NUMBER: _ClassVar[int]
    CACHE_TOKENS_LEFT_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSION_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    SERVED_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_PER_PEER_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUESTS_PER_PEER_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSION_LIFETIME_FIELD_NUMBER: _ClassVar[int]
    version: str
    dht_prefix: str
    span: Span
    hidden_size: int
    torch_dtype: str
    cache_tokens_left: int
    codecs: _containers.RepeatedScalarFieldContainer[str]
    max_batch_size: int
    max_tokens_per_request: int
    max_session_length: int
    max_lora_rank: int
    served: RequestCounts
    max_sessions_per_peer: int
    max_requests_per_peer: int
    max_session_lifetime: float
    def __init__(self, version: _Optional[str] = ..., dht_prefix: _Optional[str] = ..., span: _Optional[_Union[Span, _Mapping]] = ..., hidden_size: _Optional[int] = ..., torch_dtype: _Optional[str] = ..., cache_tokens_left: _Optional[int] = ..., codecs: _Optional[_Iterable[str]] = ..., max_batch_size: _Optional[int] = ..., max_tokens_per_request: _Optional[int] = ..., max_session_length: _Optional[int] = ..., max_lora_rank: _Optional[int] = ..., served: _Optional[_Union[RequestCounts, _Mapping]] = ..., max_sessions_per_peer: _Optional[int] = ..., max_requests_per_peer: _Optional[int] = ..., max_session_lifetime: _Optional[float] = ...) -> None: ...

class RequestCounts(_message.Message):
    __slots__ = ("sessions_opened", "inference_steps", "forwards", "backwards", "pushed_steps", "merged_forwards", "merged_steps")
    SESSIONS_OPENED_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    FORWARDS_FIELD_NUMBER: _ClassVar[int]
    BACKWARDS_FIELD_NUMBER: _ClassVar[int]
    PUSHED_STEPS_FIELD_NUMBER: _ClassVar[int]
    MERGED_FORWARDS_FIELD_NUMBER: _ClassVar[int]
    MERGED_STEPS_FIELD_NUMBER: _ClassVar[int]
    sessions_opened: int
    inference_steps: int
    forwards: int
    backwards: int
    pushed_steps: int
    merged_forwards: int
    merged_steps: int
    def __init__(self, sessions_opened: _Optional[int] = ..., inference_steps: _Optional[int] = ..., forwards: _Optional[int] = ..., backwards: _Optional[int] = ..., pushed_steps: _Optional[int] = ..., merged_forwards: _Optional[int] = ..., merged_steps: _Optional[int] = ...) -> None: ...

class NamedTensor(_message.Message):
    __slots__ = ("name", "tensor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    tensor: Tensor
    def __init__(self, name: _Optional[str] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Adapter(_message.Message):
    __slots__ = ("lora_rank", "lora_alpha", "lora_dropout", "use_rslora", "lora", "deep_prompts", "adapter_hash", "arrow_hashes", "arrow_top_k", "arrow_score")
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    LORA_DROPOUT_FIELD_NUMBER: _ClassVar[int]
    USE_RSLORA_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    DEEP_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_HASH_FIELD_NUMBER: _ClassVar[int]
    ARROW_HASHES_FIELD_NUMBER: _ClassVar[int]
    ARROW_TOP_K_FIELD_NUMBER: _ClassVar[int]
    ARROW_SCORE_FIELD_NUMBER: _ClassVar[int]
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool
    lora: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    deep_prompts: Tensor
    adapter_hash: str
    arrow_hashes: _containers.RepeatedScalarFieldContainer[str]
    arrow_top_k: int
    arrow_score: bool
    def __init__(self, lora_rank: _Optional[int] = ..., lora_alpha: _Optional[float] = ..., lora_dropout: _Optional[float] = ..., use_rslora: _Optional[bool] = ..., lora: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., deep_prompts: _Optional[_Union[Tensor, _Mapping]] = ..., adapter_hash: _Optional[str] = ..., arrow_hashes: _Optional[_Iterable[str]] = ..., arrow_top_k: _Optional[int] = ..., arrow_score: _Optional[bool] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("span", "hidden_states", "response_codec", "adapter", "forward_id", "dropout_seed", "attention_mask")
    SPAN_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_CODEC_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    FORWARD_ID_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_SEED_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    span: Span
    hidden_states: Tensor
    response_codec: str
    adapter: Adapter
    forward_id: int
    dropout_seed: int
    attention_mask: bytes
    def __init__(self, span: _Optional[_Union[Span, _Mapping]] = ..., hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., response_codec: _Optional[str] = ..., adapter: _Optional[_Union[Adapter, _Mapping]] = ..., forward_id: _Optional[int] = ..., dropout_seed: _Optional[int] = ..., attention_mask: _Optional[bytes] = ...) -> None: ...

class BackwardRequest(_message.Message):
    __slots__ = ("span", "hidden_states", "grad_outputs", "response_codec", "adapter", "forward_id", "dropout_seed", "attention_mask")
    SPAN_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    GRAD_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_CODEC_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    FORWARD_ID_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_SEED_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    span: Span
    hidden_states: Tensor
    grad_outputs: Tensor
    response_codec: str
    adapter: Adapter
    forward_id: int
    dropout_seed: int
    attention_mask: bytes
    def __init__(self, span: _Optional[_Union[Span, _Mapping]] = ..., hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., grad_outputs: _Optional[_Union[Tensor, _Mapping]] = ..., response_codec: _Optional[str] = ..., adapter: _Optional[_Union[Adapter, _Mapping]] = ..., forward_id: _Optional[int] = ..., dropout_seed: _Optional[int] = ..., attention_mask: _Optional[bytes] = ...) -> None: ...

class BackwardResponse(_message.Message):
    __slots__ = ("grad_inputs", "lora_grads", "deep_prompt_grads", "error")
    GRAD_INPUTS_FIELD_NUMBER: _ClassVar[int]
    LORA_GRADS_FIELD_NUMBER: _ClassVar[int]
    DEEP_PROMPT_GRADS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    grad_inputs: Tensor
    lora_grads: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    deep_prompt_grads: Tensor
    error: Error
    def __init__(self, grad_inputs: _Optional[_Union[Tensor, _Mapping]] = ..., lora_grads: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., deep_prompt_grads: _Optional[_Union[Tensor, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("hidden_states", "error", "adapter_scores")
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_SCORES_FIELD_NUMBER: _ClassVar[int]
    hidden_states: Tensor
    error: Error
    adapter_scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., adapter_scores: _Optional[_Iterable[float]] = ...) -> None: ...

class InferenceRequest(_message.Message):
    __slots__ = ("open", "step", "grant")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    GRANT_FIELD_NUMBER: _ClassVar[int]
    open: SessionOpen
    step: InferenceStep
    grant: PushGrant
    def __init__(self, open: _Optional[_Union[SessionOpen, _Mapping]] = ..., step: _Optional[_Union[InferenceStep, _Mapping]] = ..., grant: _Optional[_Union[PushGrant, _Mapping]] = ...) -> None: ...

class SessionOpen(_message.Message):
    __slots__ = ("span", "max_length", "batch_size", "response_codec", "adapter", "pushers")
    SPAN_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_CODEC_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    PUSHERS_FIELD_NUMBER: _ClassVar[int]
    span: Span
    max_length: int
    batch_size: int
    response_codec: str
    adapter: Adapter
    pushers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, span: _Optional[_Union[Span, _Mapping]] = ..., max_length: _Optional[int] = ..., batch_size: _Optional[int] = ..., response_codec: _Optional[str] = ..., adapter: _Optional[_Union[Adapter, _Mapping]] = ..., pushers: _Optional[_Iterable[str]] = ...) -> None: ...

class InferenceStep(_message.Message):
    __slots__ = ("hidden_states", "position", "step_id", "attention_mask", "reorder", "push_to")
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    REORDER_FIELD_NUMBER: _ClassVar[int]
    PUSH_TO_FIELD_NUMBER: _ClassVar[int]
    hidden_states: Tensor
    position: int
    step_id: int
    attention_mask: bytes
    reorder: _containers.RepeatedScalarFieldContainer[int]
    push_to: _containers.RepeatedCompositeFieldContainer[PushHop]
    def __init__(self, hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., position: _Optional[int] = ..., step_id: _Optional[int] = ..., attention_mask: _Optional[bytes] = ..., reorder: _Optional[_Iterable[int]] = ..., push_to: _Optional[_Iterable[_Union[PushHop, _Mapping]]] = ...) -> None: ...

class PushHop(_message.Message):
    __slots__ = ("peer_id", "session_id", "reorder")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REORDER_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    session_id: bytes
    reorder: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, peer_id: _Optional[str] = ..., session_id: _Optional[bytes] = ..., reorder: _Optional[_Iterable[int]] = ...) -> None: ...

class PushGrant(_message.Message):
    __slots__ = ("pushers",)
    PUSHERS_FIELD_NUMBER: _ClassVar[int]
    pushers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, pushers: _Optional[_Iterable[str]] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("session_id", "step")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    session_id: bytes
    step: InferenceStep
    def __init__(self, session_id: _Optional[bytes] = ..., step: _Optional[_Union[InferenceStep, _Mapping]] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("error",)
    ERROR_FIELD_NUMBER: _ClassVar[int]
    error: Error
    def __init__(self, error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class InferenceResponse(_message.Message):
    __slots__ = ("opened", "step", "error", "granted")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    opened: SessionOpened
    step: StepResult
    error: Error
    granted: PushGrant
    def __init__(self, opened: _Optional[_Union[SessionOpened, _Mapping]] = ..., step: _Optional[_Union[StepResult, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., granted: _Optional[_Union[PushGrant, _Mapping]] = ...) -> None: ...

class SessionOpened(_message.Message):
    __slots__ = ("max_length", "max_tokens_per_request", "session_id")
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    max_length: int
    max_tokens_per_request: int
    session_id: bytes
    def __init__(self, max_length: _Optional[int] = ..., max_tokens_per_request: _Optional[int] = ..., session_id: _Optional[bytes] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("hidden_states", "position", "step_id", "pushed", "push_error")
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    PUSHED_FIELD_NUMBER: _ClassVar[int]
    PUSH_ERROR_FIELD_NUMBER: _ClassVar[int]
    hidden_states: Tensor
    position: int
    step_id: int
    pushed: bool
    push_error: str
    def __init__(self, hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., position: _Optional[int] = ..., step_id: _Optional[int] = ..., pushed: _Optional[bool] = ..., push_error: _Optional[str] = ...) -> None: ...

class ReachabilityRequest(_message.Message):
    __slots__ = ("maddrs",)
    MADDRS_FIELD_NUMBER: _ClassVar[int]
    maddrs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, maddrs: _Optional[_Iterable[str]] = ...) -> None: ...

class ReachabilityResponse(_message.Message):
    __slots__ = ("reachable", "error")
    REACHABLE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    reachable: bool
    error: str
    def __init__(self, reachable: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("model_id", "manifest", "file", "tensor")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    manifest: bool
    file: str
    tensor: TensorRange
    def __init__(self, model_id: _Optional[str] = ..., manifest: _Optional[bool] = ..., file: _Optional[str] = ..., tensor: _Optional[_Union[TensorRange, _Mapping]] = ...) -> None: ...

class TensorRange(_message.Message):
    __slots__ = ("name", "offset", "length")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    name: str
    offset: int
    length: int
    def __init__(self, name: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class FetchChunk(_message.Message):
    __slots__ = ("data", "error")
    DATA_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    error: Error
    def __init__(self, data: _Optional[bytes] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class AdapterSlice(_message.Message):
    __slots__ = ("manifest", "span", "tensors")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    SPAN_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    manifest: bytes
    span: Span
    tensors: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, manifest: _Optional[bytes] = ..., span: _Optional[_Union[Span, _Mapping]] = ..., tensors: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...

class AdapterFetchRequest(_message.Message):
    __slots__ = ("adapter_hash", "span")
    ADAPTER_HASH_FIELD_NUMBER: _ClassVar[int]
    SPAN_FIELD_NUMBER: _ClassVar[int]
    adapter_hash: str
    span: Span
    def __init__(self, adapter_hash: _Optional[str] = ..., span: _Optional[_Union[Span, _Mapping]] = ...) -> None: ...

class AdapterFetchResponse(_message.Message):
    __slots__ = ("slice", "error")
    SLICE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    slice: AdapterSlice
    error: Error
    def __init__(self, slice: _Optional[_Union[AdapterSlice, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class AdapterStoreRequest(_message.Message):
    __slots__ = ("slice", "name_record", "name")
    SLICE_FIELD_NUMBER: _ClassVar[int]
    NAME_RECORD_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    slice: AdapterSlice
    name_record: bytes
    name: str
    def __init__(self, slice: _Optional[_Union[AdapterSlice, _Mapping]] = ..., name_record: _Optional[bytes] = ..., name: _Optional[str] = ...) -> None: ...

class AdapterStoreResponse(_message.Message):
    __slots__ = ("error",)
    ERROR_FIELD_NUMBER: _ClassVar[int]
    error: Error
    def __init__(self, error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...
