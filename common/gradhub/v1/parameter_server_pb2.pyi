from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]

class Layout(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LAYOUT_UNSPECIFIED: _ClassVar[Layout]
    LAYOUT_DENSE: _ClassVar[Layout]
    LAYOUT_SPARSE: _ClassVar[Layout]

class IndexEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INDEX_ENCODING_RAW: _ClassVar[IndexEncoding]
    INDEX_ENCODING_DELTA_VARINT: _ClassVar[IndexEncoding]
    INDEX_ENCODING_BITMAP: _ClassVar[IndexEncoding]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_INT32: DType
DTYPE_INT64: DType
DTYPE_UINT8: DType
DTYPE_INT8: DType
LAYOUT_UNSPECIFIED: Layout
LAYOUT_DENSE: Layout
LAYOUT_SPARSE: Layout
INDEX_ENCODING_RAW: IndexEncoding
INDEX_ENCODING_DELTA_VARINT: IndexEncoding
INDEX_ENCODING_BITMAP: IndexEncoding

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype", "layout", "nnz", "index_dtype", "byte_length", "index_encoding", "index_bytes", "scale_block")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    NNZ_FIELD_NUMBER: _ClassVar[int]
    INDEX_DTYPE_FIELD_NUMBER: _ClassVar[int]
    BYTE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    INDEX_ENCODING_FIELD_NUMBER: _ClassVar[int]
    INDEX_BYTES_FIELD_NUMBER: _ClassVar[int]
    SCALE_BLOCK_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    layout: Layout
    nnz: int
    index_dtype: DType
    byte_length: int
    index_encoding: IndexEncoding
    index_bytes: int
    scale_block: int
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., layout: _Optional[_Union[Layout, str]] = ..., nnz: _Optional[int] = ..., index_dtype: _Optional[_Union[DType, str]] = ..., byte_length: _Optional[int] = ..., index_encoding: _Optional[_Union[IndexEncoding, str]] = ..., index_bytes: _Optional[int] = ..., scale_block: _Optional[int] = ...) -> None: ...

class PushHeader(_message.Message):
    __slots__ = ("run_id", "worker_id", "seq", "base_version", "tensors", "payload_bytes", "loss", "samples", "pull_dtype", "pull_delta")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    PULL_DTYPE_FIELD_NUMBER: _ClassVar[int]
    PULL_DELTA_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    worker_id: str
    seq: int
    base_version: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    payload_bytes: int
    loss: float
    samples: int
    pull_dtype: DType
    pull_delta: bool
    def __init__(self, run_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., seq: _Optional[int] = ..., base_version: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., payload_bytes: _Optional[int] = ..., loss: _Optional[float] = ..., samples: _Optional[int] = ..., pull_dtype: _Optional[_Union[DType, str]] = ..., pull_delta: _Optional[bool] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("header", "offset", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    offset: int
    data: bytes
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("version", "staleness", "finished")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    version: int
    staleness: int
    finished: bool
    def __init__(self, version: _Optional[int] = ..., staleness: _Optional[int] = ..., finished: _Optional[bool] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("run_id", "worker_id", "min_version", "dtype", "have_version")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    HAVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    worker_id: str
    min_version: int
    dtype: DType
    have_version: int
    def __init__(self, run_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., min_version: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., have_version: _Optional[int] = ...) -> None: ...

class PullHeader(_message.Message):
    __slots__ = ("version", "tensors", "payload_bytes", "finished", "delta_from")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    DELTA_FROM_FIELD_NUMBER: _ClassVar[int]
    version: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    payload_bytes: int
    finished: bool
    delta_from: int
    def __init__(self, version: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., payload_bytes: _Optional[int] = ..., finished: _Optional[bool] = ..., delta_from: _Optional[int] = ...) -> None: ...

class PullResponse(_message.Message):
    __slots__ = ("header", "offset", "data", "pushed")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    PUSHED_FIELD_NUMBER: _ClassVar[int]
    header: PullHeader
    offset: int
    data: bytes
    pushed: PushReply
    def __init__(self, header: _Optional[_Union[PullHeader, _Mapping]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., pushed: _Optional[_Union[PushReply, _Mapping]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerStatus(_message.Message):
    __slots__ = ("run_id", "mode", "version", "steps", "finished", "live_workers", "pushes_applied", "pushes_refused")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    LIVE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    PUSHES_APPLIED_FIELD_NUMBER: _ClassVar[int]
    PUSHES_REFUSED_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    mode: str
    version: int
    steps: int
    finished: bool
    live_workers: _containers.RepeatedScalarFieldContainer[str]
    pushes_applied: int
    pushes_refused: int
    def __init__(self, run_id: _Optional[str] = ..., mode: _Optional[str] = ..., version: _Optional[int] = ..., steps: _Optional[int] = ..., finished: _Optional[bool] = ..., live_workers: _Optional[_Iterable[str]] = ..., pushes_applied: _Optional[int] = ..., pushes_refused: _Optional[int] = ...) -> None: ...
