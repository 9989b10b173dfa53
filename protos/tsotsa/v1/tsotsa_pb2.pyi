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
    __slots__ = ("model_id", "peer_id", "start_block", "end_block", "state", "device", "dtype", "quant", "throughput", "open_sessions", "max_sessions", "cache_bytes_used", "cache_bytes_limit", "checkpoint_bytes_read", "parameter_bytes_held", "checkpoint_bytes_total")
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
    def __init__(self, model_id: _Optional[str] = ..., peer_id: _Optional[str] = ..., start_block: _Optional[int] = ..., end_block: _Optional[int] = ..., state: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., quant: _Optional[str] = ..., throughput: _Optional[float] = ..., open_sessions: _Optional[int] = ..., max_sessions: _Optional[int] = ..., cache_bytes_used: _Optional[int] = ..., cache_bytes_limit: _Optional[int] = ..., checkpoint_bytes_read: _Optional[int] = ..., parameter_bytes_held: _Optional[int] = ..., checkpoint_bytes_total: _Optional[int] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("model_id", "start_block", "end_block", "hidden_states", "attention_mask", "position_ids")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_BLOCK_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    POSITION_IDS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    start_block: int
    end_block: int
    hidden_states: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    def __init__(self, model_id: _Optional[str] = ..., start_block: _Optional[int] = ..., end_block: _Optional[int] = ..., hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[Tensor, _Mapping]] = ..., position_ids: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("hidden_states",)
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    hidden_states: Tensor
    def __init__(self, hidden_states: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("model_id", "start_block", "end_block", "batch_size", "max_length")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_BLOCK_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    start_block: int
    end_block: int
    batch_size: int
    max_length: int
    def __init__(self, model_id: _Optional[str] = ..., start_block: _Optional[int] = ..., end_block: _Optional[int] = ..., batch_size: _Optional[int] = ..., max_length: _Optional[int] = ...) -> None: ...

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

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "config_json", "num_blocks", "dht_initial_peers", "tokenizer_files", "torch_dtype", "total_bytes")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DHT_INITIAL_PEERS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FILES_FIELD_NUMBER: _ClassVar[int]
    TORCH_DTYPE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    config_json: str
    num_blocks: int
    dht_initial_peers: _containers.RepeatedScalarFieldContainer[str]
    tokenizer_files: _containers.RepeatedScalarFieldContainer[str]
    torch_dtype: str
    total_bytes: int
    def __init__(self, model_id: _Optional[str] = ..., config_json: _Optional[str] = ..., num_blocks: _Optional[int] = ..., dht_initial_peers: _Optional[_Iterable[str]] = ..., tokenizer_files: _Optional[_Iterable[str]] = ..., torch_dtype: _Optional[str] = ..., total_bytes: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("model_id", "num_blocks", "peers")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    num_blocks: int
    peers: _containers.RepeatedCompositeFieldContainer[PeerRecord]
    def __init__(self, model_id: _Optional[str] = ..., num_blocks: _Optional[int] = ..., peers: _Optional[_Iterable[_Union[PeerRecord, _Mapping]]] = ...) -> None: ...

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
