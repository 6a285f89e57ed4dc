"""Dot products formed in registers, for compiled loops that use a product's entries as they form them:
bfloat16 with AMX or pairs on AVX512-BF16, float32 on AVX-512 or AVX2.

A matrix product handed to a library has to be written out in full before a loop can reduce it: for
the search's bounded product (28 columns, see :mod:`anomaly.search`) that write and the read after it
took longer than the multiplying. :func:`tile` instead forms a small tile of entries in registers
(ROWS gallery rows x LANES queries): it starts each sum from the entry's other terms (weighted rows of
float32 values), adds the product, and hands back only each query's minimum over the tile's rows. In
bfloat16 the product comes from the CPU's ``VDPBF16PS`` instruction (16 float32 lanes, each adding the
products of a pair of bfloat16 values, exact, to its sum); in float32 from fused multiply-adds, one
column at a time, in 16 lanes (AVX-512) or 8 (AVX2).

On CPUs with AMX (Intel Xeon since Sapphire Rapids) a bfloat16 product of up to 16 pairs is formed by the tile
unit instead (:func:`amx_rows`): one ``TDPBF16PS`` multiplies 8 gallery rows by 16 queries, eight times the
work of ``VDPBF16PS``, and the 8 x 32 sums go to a buffer that stays in the first-level cache, where the
loop adds the entry's other terms. On a 2-core Xeon that took the bound's minima loop from 0.17 to 0.11 s
per image (``bench/bench.py --section pixel``, efficientnet_lite0): AVX512-BF16 there multiplies at about the
float32 rate.

bfloat16 operands are packed in pairs of columns, one int32 each (:func:`pack_rows`; float32 ones stay as
they are): a gallery row's pair (or value) is broadcast to all lanes, and 16 queries' pairs are read
as one vector, so the queries' side is stored pair-major (:func:`pack_columns`).

numba has no bfloat16 type, no vector types and no tiles; :func:`tile` and :func:`amx_rows` are written as
LLVM IR through numba's ``intrinsic``. LLVM can only emit the bfloat16 tile for a CPU with AVX512-BF16; the
float32 one is formed in blocks small enough for the CPU's vector registers: :func:`instructions` says where
each may be used. The loops that use them are cached on disk under a key that includes :data:`SOURCE_DIGEST`.
"""

from __future__ import annotations

import ctypes
import hashlib
from functools import lru_cache, partial
from pathlib import Path

import llvmlite.binding
import numba
import numpy as np
import torch
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from anomaly.jit import compiled

LANES = 32
"""Query columns per tile: two 512-bit vectors of float32 sums on AVX-512, four 256-bit ones on AVX2."""
ROWS = 8
"""Gallery rows per tile, at most."""
_INSTRUCTION = "llvm.x86.avx512bf16.dpbf16ps.512"
SOURCE_DIGEST = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
"""This file's SHA-256: the compiled loops that inline :func:`tile` close over it, so that numba's disk cache
compiles them again when it changes (see :func:`anomaly.fused._closing_over`)."""
AVX2_ONLY = {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": (
    "+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+f16c,+fma,+fxsr,+lzcnt,+mmx,+movbe,+popcnt,+sahf,+sse,+sse2,+sse3,"
    "+sse4.1,+sse4.2,+ssse3,+xsave")}
"""Environment under which a new process's numba compiles for an AVX2 CPU without AVX-512 (Haswell, most
laptops' instruction set), so that a machine with AVX-512 can test and time the code those CPUs run."""


def _has(feature: str) -> bool:
    """Whether numba compiles for a CPU with ``feature``: its host, unless ``NUMBA_CPU_NAME`` names another
    (then only what ``NUMBA_CPU_FEATURES`` promises)."""
    if numba.config.CPU_NAME is not None:
        return f"+{feature}" in (numba.config.CPU_FEATURES or "")
    return bool(llvmlite.binding.get_host_cpu_features().get(feature, False))


@lru_cache(maxsize=2)
def instructions(dtype: torch.dtype) -> str | None:
    """The instructions :func:`tile` forms ``dtype`` products with here, or None where it may not be used:
    bfloat16 needs AVX512-BF16 and an LLVM that names the instruction's operands ``bfloat`` (17 and later);
    float32 needs fused multiply-adds in 512-bit (AVX-512) or 256-bit vectors (AVX2 and FMA). "AMX-BF16"
    where :func:`amx_rows` may be used too (bfloat16 products of up to 16 pairs)."""
    if dtype == torch.bfloat16:
        if llvmlite.binding.llvm_version_info[0] < 17 or not _has("avx512bf16"):
            return None
        return "AMX-BF16" if _has("amx-tile") and _has("amx-bf16") and _amx_permitted() else "AVX512-BF16"
    if _has("avx512f"):
        return "AVX-512"
    return "AVX2" if _has("avx2") and _has("fma") else None


def supported(dtype: torch.dtype) -> bool:
    """Whether :func:`tile` may be used for ``dtype`` (see :func:`instructions`)."""
    return instructions(dtype) is not None


def pack_rows(x: torch.Tensor, pad_rows: int = 0) -> np.ndarray:
    """(N + pad_rows, ceil(C / 2)) int32: the rows of bfloat16 ``x`` (N, C), two columns to an int32 (a zero
    column appended to an odd count), then ``pad_rows`` zero rows (a tile reads ROWS rows from any start).
    float32 ``x``: (N + pad_rows, C) float32, its rows as they are."""
    if x.dtype == torch.float32:
        padded = torch.zeros(len(x) + pad_rows, x.shape[1])
        padded[: len(x)] = x
        return padded.numpy()
    packed = torch.zeros(len(x) + pad_rows, x.shape[1] + x.shape[1] % 2, dtype=torch.bfloat16)
    packed[: len(x), : x.shape[1]] = x
    return packed.view(torch.int32).numpy()


def pack_columns(x: torch.Tensor) -> np.ndarray:
    """(ceil(C / 2), N + LANES) int32 (bfloat16 ``x``) or (C, N + LANES) float32: :func:`pack_rows` of ``x``
    (N, C) transposed, one column per row of ``x``, then LANES zero columns (a tile reads LANES columns from
    any start)."""
    return np.ascontiguousarray(pack_rows(x, LANES).T)


class _Named(ir.Type):
    """An LLVM type llvmlite does not name, written as LLVM spells it: ``bfloat``, ``x86_amx`` (an AMX tile)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _to_string(self) -> str:
        return self.name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Named) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)


_I32 = ir.VectorType(ir.IntType(32), 16)
_BF16 = ir.VectorType(_Named("bfloat"), 32)
_I64 = ir.IntType(64)
_FLOAT = ir.FloatType()
_BYTE = ir.IntType(8)


def _declare(builder: ir.IRBuilder, name: str, result: ir.Type, arguments: list[ir.Type]) -> ir.Function:
    """The intrinsic ``name`` in the builder's module, declared there once."""
    return builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(result, arguments), name)


def _address(builder: ir.IRBuilder, array, offset: ir.Value, kind: ir.Type) -> ir.Value:
    """A pointer to ``kind`` ``offset`` bytes into a numba array's data."""
    return builder.inttoptr(builder.add(builder.ptrtoint(array.data, _I64), offset), kind.as_pointer())


def _stride(builder: ir.IRBuilder, array, axis: int) -> ir.Value:
    """A numba array's stride along ``axis``, in bytes."""
    return builder.extract_value(array.strides, axis)


@intrinsic
def tile(typingctx, gallery, row, queries, column, mixed, sources, weights, base, rows, out, out_column):
    """For p < LANES, ``out[out_column + p]`` = the least over r < ``rows`` of

        base[r] + sum_j weights[r, j] * mixed[sources[j], p] + gallery[row + r] . queries[:, column + p]

    ``gallery`` (G, pairs) and ``queries`` (pairs, P) as :func:`pack_rows` and :func:`pack_columns` pack
    them: int32 (bfloat16 pairs) or float32; ``mixed`` (M, >= LANES), ``weights`` (ROWS, J), ``base`` (ROWS,)
    and ``out`` float32, ``sources`` (J,) int64, 1 <= ``rows`` <= ROWS. Reads ROWS rows and LANES columns
    whatever ``rows`` is. The products are summed pair by pair (or column by column) in order, onto the
    rest, in float32: the same sums, bit for bit, in 512-bit or 256-bit vectors.

    The tile is formed in blocks of two vectors of queries by as many rows as keep the block's sums in
    registers (half of them): 8 rows of AVX-512's 32 registers, 4 of AVX2's 16; each block's minima are
    folded into the tile's."""
    signature = types.void(gallery, row, queries, column, mixed, sources, weights, base, rows, out, out_column)

    def codegen(context, builder, signature, args):
        gallery_array, queries_array, mixed_array, sources_array, weights_array, base_array, out_array = (
            context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 2, 4, 5, 6, 7, 9))
        row, column, rows, out_column = (
            builder.sext(args[i], _I64) if args[i].type != _I64 else args[i] for i in (1, 3, 8, 10))
        bfloat16 = signature.args[0].dtype != types.float32
        width = 16 if _has("avx512f") else 8  # float32 lanes per vector
        block_rows = ROWS if width == 16 else ROWS // 2
        vector = ir.VectorType(_FLOAT, width)

        at, stride = partial(_address, builder), partial(_stride, builder)
        dpbf16ps = bfloat16 and _declare(builder, _INSTRUCTION, vector, [vector, _BF16, _BF16])
        fma = _declare(builder, f"llvm.fma.v{width}f32", vector, [vector] * 3)
        query_kind, gallery_kind = (_I32, ir.IntType(32)) if bfloat16 else (vector, _FLOAT)  # pairs or values

        def constant(value):
            return ir.Constant(_I64, value)

        def broadcast(value, kind):  # a scalar in every lane
            lanes = ir.VectorType(value.type, width)
            first = builder.insert_element(ir.Constant(lanes, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
            zeros = ir.Constant(ir.VectorType(ir.IntType(32), width), [0] * width)
            return builder.bitcast(builder.shuffle_vector(first, ir.Constant(lanes, ir.Undefined), zeros), kind)

        first_row, first_column = builder.mul(row, stride(gallery_array, 0)), builder.mul(column, constant(4))

        def form(block, vectors):
            """The sums of rows ``block`` x query vectors ``vectors``, in registers."""
            sums = {(r, v): cgutils.alloca_once(builder, vector) for r in block for v in vectors}
            for r in block:
                first = broadcast(builder.load(at(base_array, builder.mul(constant(r), stride(base_array, 0)),
                                               _FLOAT), align=4), vector)
                for v in vectors:
                    builder.store(first, sums[r, v])
            with cgutils.for_range(builder, builder.extract_value(sources_array.shape, 0)) as loop:
                source = builder.load(at(sources_array, builder.mul(loop.index, stride(sources_array, 0)), _I64),
                                      align=8)
                offset = builder.mul(source, stride(mixed_array, 0))
                terms = {v: builder.load(at(mixed_array, builder.add(offset, constant(4 * width * v)), vector),
                                         align=4) for v in vectors}
                for r in block:
                    address = builder.add(builder.mul(constant(r), stride(weights_array, 0)),
                                          builder.mul(loop.index, stride(weights_array, 1)))
                    weight = broadcast(builder.load(at(weights_array, address, _FLOAT), align=4), vector)
                    for v in vectors:
                        builder.store(builder.call(fma, [weight, terms[v], builder.load(sums[r, v])]), sums[r, v])
            with cgutils.for_range(builder, builder.extract_value(gallery_array.shape, 1)) as loop:
                offset = builder.add(first_column, builder.mul(loop.index, stride(queries_array, 0)))
                query = {v: builder.load(at(queries_array, builder.add(offset, constant(4 * width * v)),
                                            query_kind), align=4) for v in vectors}
                pair_offset = builder.add(first_row, builder.mul(loop.index, constant(4)))
                for r in block:
                    address = builder.add(pair_offset, builder.mul(constant(r), stride(gallery_array, 0)))
                    value = builder.load(at(gallery_array, address, gallery_kind), align=4)
                    for v in vectors:
                        total = builder.load(sums[r, v])
                        if bfloat16:
                            total = builder.call(dpbf16ps, [total, builder.bitcast(query[v], _BF16),
                                                            broadcast(value, _BF16)])
                        else:
                            total = builder.call(fma, [broadcast(value, vector), query[v], total])
                        builder.store(total, sums[r, v])
            return sums

        for group in range(0, LANES // width, 2):
            vectors = (group, group + 1)
            low = {}
            for first in range(0, ROWS, block_rows):  # rows in order, as one block would take them
                block = range(first, first + block_rows)
                sums = form(block, vectors)
                for v in vectors:
                    low[v] = builder.load(sums[first, v]) if first == 0 else low[v]
                    for r in block[1:] if first == 0 else block:
                        value = builder.load(sums[r, v])
                        smaller = builder.select(builder.fcmp_ordered("<", value, low[v]), value, low[v])
                        low[v] = builder.select(builder.icmp_signed(">", rows, constant(r)), smaller, low[v])
            for v in vectors:
                address = builder.add(builder.mul(out_column, constant(4)), constant(4 * width * v))
                builder.store(low[v], at(out_array, address, vector), align=4)
        return context.get_dummy_value()

    return signature, codegen


AMX_COLUMNS = 16
"""Query columns per AMX tile: 16 float32 sums, 64 bytes, a tile's widest row. :func:`amx_rows` forms two
such tiles at a time."""
AMX_PAIRS = 16
"""bfloat16 pairs of a product :func:`amx_rows` forms, at most: 64 bytes of a gallery row."""
_ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA, _SYS_ARCH_PRCTL = 0x1023, 18, 158


@lru_cache(maxsize=1)
def _amx_permitted() -> bool:
    """Linux's permission for this process to use the tile registers, asked for here (oneDNN asks the same):
    without it, the first tile instruction kills the process."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):  # not Linux
        return False


@compiled(inline="always", nogil=True)
def amx_width(count: int) -> int:
    """Columns of ``out`` that :func:`amx_rows` writes for ``count`` queries: whole rounds of two tiles."""
    return -(-count // (2 * AMX_COLUMNS)) * 2 * AMX_COLUMNS


@intrinsic
def amx_rows(typingctx, gallery, row, queries, column, count, out):
    """``out[r, p] = gallery[row + r] . queries[:, column + p]`` for r < ROWS and p < ``amx_width(count)``,
    with AMX's ``TDPBF16PS``: a tile of ROWS gallery rows times AMX_COLUMNS queries per
    instruction. ``gallery`` (G, pairs) and ``queries`` (pairs, P) int32 as :func:`pack_rows` and
    :func:`pack_columns` pack them, at most 16 pairs, ``queries`` with that many columns from ``column`` (its
    LANES zero columns cover them when ``column + count`` <= P); ``out`` (ROWS, >= that many) float32,
    C-contiguous rows. Only where :func:`instructions` says "AMX-BF16"."""
    signature = types.void(gallery, row, queries, column, count, out)

    def codegen(context, builder, signature, args):
        gallery_array, queries_array, out_array = (
            context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 2, 5))
        row, column, count = (builder.sext(args[i], _I64) if args[i].type != _I64 else args[i] for i in (1, 3, 4))
        tile, short, pointer = _Named("x86_amx"), ir.IntType(16), _BYTE.as_pointer()
        at, stride = partial(_address, builder), partial(_stride, builder)
        load = _declare(builder, "llvm.x86.tileloadd64.internal", tile, [short, short, pointer, _I64])
        zero = _declare(builder, "llvm.x86.tilezero.internal", tile, [short, short])
        multiply = _declare(builder, "llvm.x86.tdpbf16ps.internal", tile, [short, short, short, tile, tile, tile])
        store = _declare(builder, "llvm.x86.tilestored64.internal", ir.VoidType(), [short, short, pointer, _I64, tile])

        pairs = builder.extract_value(gallery_array.shape, 1)
        rows, width = ir.Constant(short, ROWS), ir.Constant(short, 4 * AMX_COLUMNS)
        # Every shape is defined before the first tile instruction, where LLVM configures the tiles.
        depth = builder.trunc(builder.mul(pairs, ir.Constant(_I64, 4)), short)  # bytes of a gallery row
        height = builder.trunc(pairs, short)  # rows of a tile of queries
        first_row = at(gallery_array, builder.mul(row, stride(gallery_array, 0)), _BYTE)
        first_column = builder.mul(column, ir.Constant(_I64, 4))
        # Two tiles of queries per round, independent, so that one's multiply overlaps the other's loads and store.
        span = 2 * AMX_COLUMNS
        rounds = builder.sdiv(builder.add(count, ir.Constant(_I64, span - 1)), ir.Constant(_I64, span))
        with cgutils.for_range(builder, rounds) as loop:
            # The same gallery rows every round, loaded again: loaded once before the loop, the tile would live
            # across it, and LLVM then fails to configure the tiles ("please define the shape earlier").
            left = builder.call(load, [rows, depth, first_row, stride(gallery_array, 0)])
            for half in range(2):
                offset = builder.add(builder.mul(loop.index, ir.Constant(_I64, 4 * span)),
                                     ir.Constant(_I64, 4 * AMX_COLUMNS * half))
                right = builder.call(load, [height, width, at(queries_array, builder.add(first_column, offset), _BYTE),
                                            stride(queries_array, 0)])
                sums = builder.call(multiply, [rows, width, depth, builder.call(zero, [rows, width]), left, right])
                builder.call(store, [rows, width, at(out_array, offset, _BYTE), stride(out_array, 0), sums])
        return context.get_dummy_value()

    return signature, codegen
