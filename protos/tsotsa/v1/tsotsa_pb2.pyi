from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "codec")
    class Codec(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        RAW: _ClassVar[Tensor.Codec]
        ZLIB: _ClassVar[Tensor.Codec]
    RAW: Tensor.Codec
    ZLIB: Tensor.Codec
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    codec: Tensor.Codec
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., codec: _Optional[_Union[Tensor.Codec, str]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PeerInfo(_message.Message):
    __slots__ = ("model_id", "peer_id", "start_block", "end_block", "state", "device", "dtype", "quant", "throughput", "open_sessions", "max_sessions", "cache_bytes_used", "cache_bytes_limit", "checkpoint_bytes_read", "parameter_bytes_held", "checkpoint_bytes_total", "rss_bytes", "uptime_seconds", "adapters", "tokens_served", "steps_served", "adapter_bytes_held")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_BLOCK_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    QUANT_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    OPEN_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_LIMIT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_BYTES_HELD_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_SERVED_FIELD_NUMBER: _ClassVar[int]
    STEPS_SERVED_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_BYTES_HELD_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    peer_id: str
    start_block: int
    end_block: int
    state: str
    device: str
    dtype: str
    quant: str
    throughput: float
    open_sessions: int
    max_sessions: int
    cache_bytes_used: int
    cache_bytes_limit: int
    checkpoint_bytes_read: int
    parameter_bytes_held: int
    checkpoint_bytes_total: int
    rss_bytes: int
    uptime_seconds: float
    adapters: _containers.RepeatedScalarFieldContainer[str]
    tokens_served: int
    steps_served: int
    adapter_bytes_held: int
    def __init__(self, model_id: _Optional[str] = ..., peer_id: _Optional[str] = ..., start_block: _Optional[int] = ..., end_block: _Optional[int] = ..., state: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., quant: _Optional[str] = ..., throughput: _Optional[float] = ..., open_sessions: _Optional[int] = ..., max_sessions: _Optional[int] = ..., cache_bytes_used: _Optional[int] = ..., cache_bytes_limit: _Optional[int] = ..., checkpoint_bytes_read: _Optional[int] = ..., parameter_bytes_held: _Optional[int] = ..., checkpoint_bytes_total: _Optional[int] = ..., rss_bytes: _Optional[int] = ..., uptime_seconds: _Optional[float] = ..., adapters: _Optional[_Iterable[str]] = ..., tokens_served: _Optional[int] = ..., steps_served: _Optional[int] = ..., adapter_bytes_held: _Optional[int] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("model_id", "start_block", "end_block", "hidden_states", "attention_mask", "position_ids", "adapter")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_BLOCK_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    POSITION_IDS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    start_block: int
    end_block: int
    hidden_states: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    adapter: str
    def __init__(self, model_id: _Optional[str] = ..., start_block: _Optional[int] = ..., end_block: _Optional[int] = ..., hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[Tensor, _Mapping]] = ..., position_ids: _Optional[_Union[Tensor, _Mapping]] = ..., adapter: _Optional[str] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("hidden_states",)
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    hidden_states: Tensor
    def __init__(self, hidden_states: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("model_id", "start_block", "end_block", "batch_size", "max_length", "adapter", "link_key")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_BLOCK_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    LINK_KEY_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    start_block: int
    end_block: int
    batch_size: int
    max_length: int
    adapter: str
    link_key: bytes
    def __init__(self, model_id: _Optional[str] = ..., start_block: _Optional[int] = ..., end_block: _Optional[int] = ..., batch_size: _Optional[int] = ..., max_length: _Optional[int] = ..., adapter: _Optional[str] = ..., link_key: _Optional[bytes] = ...) -> None: ...

class InferenceStep(_message.Message):
    __slots__ = ("hidden_states", "attention_mask", "position_ids")
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    POSITION_IDS_FIELD_NUMBER: _ClassVar[int]
    hidden_states: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    def __init__(self, hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[Tensor, _Mapping]] = ..., position_ids: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class InferenceRequest(_message.Message):
    __slots__ = ("session_id", "open", "step")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    open: OpenSession
    step: InferenceStep
    def __init__(self, session_id: _Optional[str] = ..., open: _Optional[_Union[OpenSession, _Mapping]] = ..., step: _Optional[_Union[InferenceStep, _Mapping]] = ...) -> None: ...

class InferenceResponse(_message.Message):
    __slots__ = ("session_id", "hidden_states", "cache_length")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    CACHE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    hidden_states: Tensor
    cache_length: int
    def __init__(self, session_id: _Optional[str] = ..., hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., cache_length: _Optional[int] = ...) -> None: ...

class LinkOpen(_message.Message):
    __slots__ = ("model_id", "link_key")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    LINK_KEY_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    link_key: bytes
    def __init__(self, model_id: _Optional[str] = ..., link_key: _Optional[bytes] = ...) -> None: ...

class LinkedStep(_message.Message):
    __slots__ = ("session_id", "step")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: InferenceStep
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[_Union[InferenceStep, _Mapping]] = ...) -> None: ...

class LinkSteps(_message.Message):
    __slots__ = ("steps",)
    STEPS_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedCompositeFieldContainer[LinkedStep]
    def __init__(self, steps: _Optional[_Iterable[_Union[LinkedStep, _Mapping]]] = ...) -> None: ...

class LinkRequest(_message.Message):
    __slots__ = ("open", "steps")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    open: LinkOpen
    steps: LinkSteps
    def __init__(self, open: _Optional[_Union[LinkOpen, _Mapping]] = ..., steps: _Optional[_Union[LinkSteps, _Mapping]] = ...) -> None: ...

class LinkedResult(_message.Message):
    __slots__ = ("session_id", "hidden_states", "cache_length", "code", "details")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    CACHE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    hidden_states: Tensor
    cache_length: int
    code: int
    details: str
    def __init__(self, session_id: _Optional[str] = ..., hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., cache_length: _Optional[int] = ..., code: _Optional[int] = ..., details: _Optional[str] = ...) -> None: ...

class LinkResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[LinkedResult]
    def __init__(self, results: _Optional[_Iterable[_Union[LinkedResult, _Mapping]]] = ...) -> None: ...

class LoraSpec(_message.Message):
    __slots__ = ("r", "alpha", "dropout", "target_modules", "seed", "lr", "weight_decay", "beta1", "beta2", "eps", "gradient_checkpointing")
    R_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_CHECKPOINTING_FIELD_NUMBER: _ClassVar[int]
    r: int
    alpha: float
    dropout: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    seed: int
    lr: float
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    gradient_checkpointing: bool
    def __init__(self, r: _Optional[int] = ..., alpha: _Optional[float] = ..., dropout: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., seed: _Optional[int] = ..., lr: _Optional[float] = ..., weight_decay: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ..., gradient_checkpointing: _Optional[bool] = ...) -> None: ...

class NamedTensor(_message.Message):
    __slots__ = ("name", "tensor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    tensor: Tensor
    def __init__(self, name: _Optional[str] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class OpenTrainingRequest(_message.Message):
    __slots__ = ("model_id", "run", "lora")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    run: str
    lora: LoraSpec
    def __init__(self, model_id: _Optional[str] = ..., run: _Optional[str] = ..., lora: _Optional[_Union[LoraSpec, _Mapping]] = ...) -> None: ...

class TrainingState(_message.Message):
    __slots__ = ("run", "start_block", "end_block", "trainable_parameters", "steps", "samples", "pending")
    RUN_FIELD_NUMBER: _ClassVar[int]
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_BLOCK_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    run: str
    start_block: int
    end_block: int
    trainable_parameters: int
    steps: int
    samples: int
    pending: int
    def __init__(self, run: _Optional[str] = ..., start_block: _Optional[int] = ..., end_block: _Optional[int] = ..., trainable_parameters: _Optional[int] = ..., steps: _Optional[int] = ..., samples: _Optional[int] = ..., pending: _Optional[int] = ...) -> None: ...

class TrainForwardRequest(_message.Message):
    __slots__ = ("run", "micro_batch", "hidden_states", "attention_mask", "no_input_grad")
    RUN_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    NO_INPUT_GRAD_FIELD_NUMBER: _ClassVar[int]
    run: str
    micro_batch: str
    hidden_states: Tensor
    attention_mask: Tensor
    no_input_grad: bool
    def __init__(self, run: _Optional[str] = ..., micro_batch: _Optional[str] = ..., hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[Tensor, _Mapping]] = ..., no_input_grad: _Optional[bool] = ...) -> None: ...

class TrainBackwardRequest(_message.Message):
    __slots__ = ("run", "micro_batch", "grad_output", "want_grad_input")
    RUN_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    GRAD_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    WANT_GRAD_INPUT_FIELD_NUMBER: _ClassVar[int]
    run: str
    micro_batch: str
    grad_output: Tensor
    want_grad_input: bool
    def __init__(self, run: _Optional[str] = ..., micro_batch: _Optional[str] = ..., grad_output: _Optional[_Union[Tensor, _Mapping]] = ..., want_grad_input: _Optional[bool] = ...) -> None: ...

class TrainBackwardResponse(_message.Message):
    __slots__ = ("grad_input",)
    GRAD_INPUT_FIELD_NUMBER: _ClassVar[int]
    grad_input: Tensor
    def __init__(self, grad_input: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("run", "samples", "lr")
    RUN_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    run: str
    samples: int
    lr: float
    def __init__(self, run: _Optional[str] = ..., samples: _Optional[int] = ..., lr: _Optional[float] = ...) -> None: ...

class DiscardRequest(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: str
    def __init__(self, run: _Optional[str] = ...) -> None: ...

class GetAdapterRequest(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: str
    def __init__(self, run: _Optional[str] = ...) -> None: ...

class AdapterState(_message.Message):
    __slots__ = ("state", "tensors")
    STATE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    state: TrainingState
    tensors: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, state: _Optional[_Union[TrainingState, _Mapping]] = ..., tensors: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...

class SetAdapterRequest(_message.Message):
    __slots__ = ("run", "tensors")
    RUN_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    run: str
    tensors: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, run: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...

class CloseTrainingRequest(_message.Message):
    __slots__ = ("run", "keep")
    RUN_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    run: str
    keep: bool
    def __init__(self, run: _Optional[str] = ..., keep: _Optional[bool] = ...) -> None: ...

class CloseTrainingResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "config_json", "num_blocks", "dht_initial_peers", "tokenizer_files", "torch_dtype", "total_bytes", "run_signing_key")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DHT_INITIAL_PEERS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FILES_FIELD_NUMBER: _ClassVar[int]
    TORCH_DTYPE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    RUN_SIGNING_KEY_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    config_json: str
    num_blocks: int
    dht_initial_peers: _containers.RepeatedScalarFieldContainer[str]
    tokenizer_files: _containers.RepeatedScalarFieldContainer[str]
    torch_dtype: str
    total_bytes: int
    run_signing_key: bytes
    def __init__(self, model_id: _Optional[str] = ..., config_json: _Optional[str] = ..., num_blocks: _Optional[int] = ..., dht_initial_peers: _Optional[_Iterable[str]] = ..., tokenizer_files: _Optional[_Iterable[str]] = ..., torch_dtype: _Optional[str] = ..., total_bytes: _Optional[int] = ..., run_signing_key: _Optional[bytes] = ...) -> None: ...

class RunCredential(_message.Message):
    __slots__ = ("model_id", "run", "issued_at", "expires_at")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    run: str
    issued_at: float
    expires_at: float
    def __init__(self, model_id: _Optional[str] = ..., run: _Optional[str] = ..., issued_at: _Optional[float] = ..., expires_at: _Optional[float] = ...) -> None: ...

class SignedRunCredential(_message.Message):
    __slots__ = ("credential", "signature")
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    credential: bytes
    signature: bytes
    def __init__(self, credential: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class SwarmStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PeerRecord(_message.Message):
    __slots__ = ("peer_id", "address", "start_block", "end_block", "state", "throughput", "device", "dtype", "quant", "expires_in")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_BLOCK_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    QUANT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    address: str
    start_block: int
    end_block: int
    state: str
    throughput: float
    device: str
    dtype: str
    quant: str
    expires_in: float
    def __init__(self, peer_id: _Optional[str] = ..., address: _Optional[str] = ..., start_block: _Optional[int] = ..., end_block: _Optional[int] = ..., state: _Optional[str] = ..., throughput: _Optional[float] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., quant: _Optional[str] = ..., expires_in: _Optional[float] = ...) -> None: ...

class SwarmMap(_message.Message):
    __slots__ = ("model_id", "num_blocks", "peers", "rejected_records", "reported")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_RECORDS_FIELD_NUMBER: _ClassVar[int]
    REPORTED_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    num_blocks: int
    peers: _containers.RepeatedCompositeFieldContainer[PeerRecord]
    rejected_records: int
    reported: _containers.RepeatedCompositeFieldContainer[ReportedPeer]
    def __init__(self, model_id: _Optional[str] = ..., num_blocks: _Optional[int] = ..., peers: _Optional[_Iterable[_Union[PeerRecord, _Mapping]]] = ..., rejected_records: _Optional[int] = ..., reported: _Optional[_Iterable[_Union[ReportedPeer, _Mapping]]] = ...) -> None: ...

class PeerReport(_message.Message):
    __slots__ = ("model_id", "peer_id", "start_block", "end_block", "reason")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_BLOCK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    peer_id: str
    start_block: int
    end_block: int
    reason: str
    def __init__(self, model_id: _Optional[str] = ..., peer_id: _Optional[str] = ..., start_block: _Optional[int] = ..., end_block: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class PeerReportAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReportedPeer(_message.Message):
    __slots__ = ("peer_id", "reports", "last_reason", "seconds_ago")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    LAST_REASON_FIELD_NUMBER: _ClassVar[int]
    SECONDS_AGO_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    reports: int
    last_reason: str
    seconds_ago: float
    def __init__(self, peer_id: _Optional[str] = ..., reports: _Optional[int] = ..., last_reason: _Optional[str] = ..., seconds_ago: _Optional[float] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("model_id", "tensor_prefixes", "file_names")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PREFIXES_FIELD_NUMBER: _ClassVar[int]
    FILE_NAMES_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    tensor_prefixes: _containers.RepeatedScalarFieldContainer[str]
    file_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_id: _Optional[str] = ..., tensor_prefixes: _Optional[_Iterable[str]] = ..., file_names: _Optional[_Iterable[str]] = ...) -> None: ...

class FetchChunk(_message.Message):
    __slots__ = ("name", "is_file", "dtype", "shape", "total_bytes", "offset", "data", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IS_FILE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    is_file: bool
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    total_bytes: int
    offset: int
    data: bytes
    sha256: str
    def __init__(self, name: _Optional[str] = ..., is_file: _Optional[bool] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., total_bytes: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., sha256: _Optional[str] = ...) -> None: ...

class RunConfig(_message.Message):
    __slots__ = ("rounds", "steps_per_round", "micro_batch", "grad_accum", "seq_len", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "lr", "weight_decay", "seed", "gradient_checkpointing", "out_dir", "lr_schedule", "warmup_steps", "verify_fraction")
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_ROUND_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    GRAD_ACCUM_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    LORA_R_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    LORA_DROPOUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_CHECKPOINTING_FIELD_NUMBER: _ClassVar[int]
    OUT_DIR_FIELD_NUMBER: _ClassVar[int]
    LR_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_FRACTION_FIELD_NUMBER: _ClassVar[int]
    rounds: int
    steps_per_round: int
    micro_batch: int
    grad_accum: int
    seq_len: int
    lora_r: int
    lora_alpha: float
    lora_dropout: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    lr: float
    weight_decay: float
    seed: int
    gradient_checkpointing: bool
    out_dir: str
    lr_schedule: str
    warmup_steps: int
    verify_fraction: float
    def __init__(self, rounds: _Optional[int] = ..., steps_per_round: _Optional[int] = ..., micro_batch: _Optional[int] = ..., grad_accum: _Optional[int] = ..., seq_len: _Optional[int] = ..., lora_r: _Optional[int] = ..., lora_alpha: _Optional[float] = ..., lora_dropout: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., lr: _Optional[float] = ..., weight_decay: _Optional[float] = ..., seed: _Optional[int] = ..., gradient_checkpointing: _Optional[bool] = ..., out_dir: _Optional[str] = ..., lr_schedule: _Optional[str] = ..., warmup_steps: _Optional[int] = ..., verify_fraction: _Optional[float] = ...) -> None: ...

class CreateRunRequest(_message.Message):
    __slots__ = ("name", "config", "train_name", "train_data", "eval_name", "eval_data", "train_upload", "eval_upload")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    TRAIN_NAME_FIELD_NUMBER: _ClassVar[int]
    TRAIN_DATA_FIELD_NUMBER: _ClassVar[int]
    EVAL_NAME_FIELD_NUMBER: _ClassVar[int]
    EVAL_DATA_FIELD_NUMBER: _ClassVar[int]
    TRAIN_UPLOAD_FIELD_NUMBER: _ClassVar[int]
    EVAL_UPLOAD_FIELD_NUMBER: _ClassVar[int]
    name: str
    config: RunConfig
    train_name: str
    train_data: bytes
    eval_name: str
    eval_data: bytes
    train_upload: str
    eval_upload: str
    def __init__(self, name: _Optional[str] = ..., config: _Optional[_Union[RunConfig, _Mapping]] = ..., train_name: _Optional[str] = ..., train_data: _Optional[bytes] = ..., eval_name: _Optional[str] = ..., eval_data: _Optional[bytes] = ..., train_upload: _Optional[str] = ..., eval_upload: _Optional[str] = ...) -> None: ...

class DataChunk(_message.Message):
    __slots__ = ("name", "total_bytes", "data", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    total_bytes: int
    data: bytes
    sha256: str
    def __init__(self, name: _Optional[str] = ..., total_bytes: _Optional[int] = ..., data: _Optional[bytes] = ..., sha256: _Optional[str] = ...) -> None: ...

class DataUpload(_message.Message):
    __slots__ = ("upload_id", "total_bytes", "sha256", "expires_in")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    total_bytes: int
    sha256: str
    expires_in: float
    def __init__(self, upload_id: _Optional[str] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., expires_in: _Optional[float] = ...) -> None: ...

class RoundInfo(_message.Message):
    __slots__ = ("round", "state", "train_loss", "eval_loss", "samples", "tokens", "tokens_per_s", "checkpoint", "wire_bytes", "peers")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    WIRE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    round: int
    state: str
    train_loss: float
    eval_loss: float
    samples: int
    tokens: int
    tokens_per_s: float
    checkpoint: str
    wire_bytes: int
    peers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, round: _Optional[int] = ..., state: _Optional[str] = ..., train_loss: _Optional[float] = ..., eval_loss: _Optional[float] = ..., samples: _Optional[int] = ..., tokens: _Optional[int] = ..., tokens_per_s: _Optional[float] = ..., checkpoint: _Optional[str] = ..., wire_bytes: _Optional[int] = ..., peers: _Optional[_Iterable[str]] = ...) -> None: ...

class RunInfo(_message.Message):
    __slots__ = ("name", "state", "message", "config_json", "rounds_done", "rounds", "train_examples", "eval_examples")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_DONE_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    EVAL_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: str
    message: str
    config_json: str
    rounds_done: int
    rounds: _containers.RepeatedCompositeFieldContainer[RoundInfo]
    train_examples: int
    eval_examples: int
    def __init__(self, name: _Optional[str] = ..., state: _Optional[str] = ..., message: _Optional[str] = ..., config_json: _Optional[str] = ..., rounds_done: _Optional[int] = ..., rounds: _Optional[_Iterable[_Union[RoundInfo, _Mapping]]] = ..., train_examples: _Optional[int] = ..., eval_examples: _Optional[int] = ...) -> None: ...

class RunRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RunList(_message.Message):
    __slots__ = ("runs",)
    RUNS_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[RunInfo]
    def __init__(self, runs: _Optional[_Iterable[_Union[RunInfo, _Mapping]]] = ...) -> None: ...

class RunEvent(_message.Message):
    __slots__ = ("kind", "round", "steps_done", "steps_total", "loss", "tokens_per_s", "peers", "state", "message", "eval_loss", "samples", "checkpoint")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STEPS_DONE_FIELD_NUMBER: _ClassVar[int]
    STEPS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    kind: str
    round: int
    steps_done: int
    steps_total: int
    loss: float
    tokens_per_s: float
    peers: _containers.RepeatedScalarFieldContainer[str]
    state: str
    message: str
    eval_loss: float
    samples: int
    checkpoint: str
    def __init__(self, kind: _Optional[str] = ..., round: _Optional[int] = ..., steps_done: _Optional[int] = ..., steps_total: _Optional[int] = ..., loss: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., peers: _Optional[_Iterable[str]] = ..., state: _Optional[str] = ..., message: _Optional[str] = ..., eval_loss: _Optional[float] = ..., samples: _Optional[int] = ..., checkpoint: _Optional[str] = ...) -> None: ...

class AdapterRequest(_message.Message):
    __slots__ = ("run", "start_block", "end_block")
    RUN_FIELD_NUMBER: _ClassVar[int]
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_BLOCK_FIELD_NUMBER: _ClassVar[int]
    run: str
    start_block: int
    end_block: int
    def __init__(self, run: _Optional[str] = ..., start_block: _Optional[int] = ..., end_block: _Optional[int] = ...) -> None: ...

class AdapterTensors(_message.Message):
    __slots__ = ("run", "lora", "tensors")
    RUN_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    run: str
    lora: LoraSpec
    tensors: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, run: _Optional[str] = ..., lora: _Optional[_Union[LoraSpec, _Mapping]] = ..., tensors: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...
