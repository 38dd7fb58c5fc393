"""``dagan export optimize``: the per-frame graph rewritten for ONNX Runtime's CPU kernels, same function.

Profiling the bundled ``live-128`` frame graph by operator (onnxruntime's profiler, see
docs/export.md "What the CPU graph changes") showed that most of a frame's time went to a few ops that
ONNX Runtime's CPU provider runs far below the machine's speed, not to the network's arithmetic:

- ``GridSample`` (the warps): ONNX Runtime's CPU kernel recomputes every sample's coordinates and
  weights once per channel in scalar code, ~8x slower than PyTorch's ``grid_sample`` on the same
  tensors. :func:`gather_grid_sample` computes the four corner indices and bilinear weights once per
  output pixel and gathers all channels of a corner at once from a channels-last copy of the input.
- Convolutions with 1-4 output channels at full resolution (the output image's 7x7 conv, the
  depth head): the NCHWc kernels pad the output channels to a block of 8, so a 3-channel conv does
  8/3 of its work at half the efficiency of a wide one. :func:`space_to_depth_conv` runs the same
  convolution on the 2x2 space-to-depth rearrangement of its input (4x the channels at a quarter of
  the pixels, weights rearranged, zeros where a tap falls outside the kernel) and puts the pixels back
  with ``DepthToSpace``.
- Batched 2x2 ``MatMul`` (a keypoint's Jacobian applied to every pixel of the motion grid): thousands
  of tiny matrix products. :func:`pixel_matmul` makes them one product per keypoint, pixels as rows.
- A blur computed at full resolution and then subsampled with strided ``Slice`` (the keypoint
  detector's anti-aliased downscale): :func:`strided_conv_slice` computes only the kept pixels.
- A 1-channel convolution beside a sibling reading the same tensor with the same geometry (the
  dense-motion occlusion and mask heads): :func:`fuse_sibling_convs` runs them as one convolution and
  a ``Split``.

The rewrites apply to every graph that runs per frame (:data:`PER_FRAME_GRAPHS`). Every rewrite
computes the same function with the same weights (rearranged, never changed): the network
and its checkpoint are untouched, and :func:`optimize_model` checks each pass against the graph before it
on random inputs (max abs difference at float rounding level) and drops a pass that does not hold.
The result is meant for the CPU provider only: TensorRT and CUDA have fast native ``GridSample`` and
convolutions, so ``dagan export trt`` keeps reading the plain export.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dagan.checkpoint import atomic_write
from dagan.graph_contract import copy_lid_reader

from .onnx_export import MANIFEST, ExportError, read_manifest

#: The passes in the order they run (each is measured on its own in docs/export.md).
PASSES = (
    "gather_grid_sample",
    "space_to_depth_conv",
    "pixel_matmul",
    "strided_conv_slice",
    "fuse_sibling_convs",
)
#: Largest absolute difference a pass may introduce on the probe inputs (outputs are images in [0, 1],
#: depths and keypoints in [-1, 1]; float32 summation order alone gives ~1e-6).
TOLERANCE = 1e-4


class _Graph:
    """Small helpers over a GraphProto: producers, consumers, constants and fresh names."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.graph = model.graph
        self._counter = 0
        self.refresh()

    def refresh(self) -> None:
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers: dict[str, list[Any]] = {}
        for n in self.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.inits = {i.name: i for i in self.graph.initializer}
        self.outputs = {o.name for o in self.graph.output}

    def name(self, hint: str) -> str:
        self._counter += 1
        return f"/opt/{hint}_{self._counter}"

    def const(self, value: Any, hint: str, dtype: Any = np.float32) -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def value(self, name: str) -> np.ndarray | None:
        """The constant value of a tensor (an initializer or a Constant node's output), else None."""
        from onnx import numpy_helper

        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def attrs(self, node: Any) -> dict[str, Any]:
        from onnx import helper

        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def replace(self, old: Sequence[Any], new: Sequence[Any]) -> None:
        """Put ``new`` nodes where the first of ``old`` was (keeps the list topologically sorted as long
        as ``new`` only reads tensors produced before that point) and remove ``old``."""
        nodes = [copy.deepcopy(n) for n in self.graph.node]
        ids = {tuple(n.output) for n in old}  # a node's outputs are unique (SSA): its identity here
        at = min(i for i, n in enumerate(nodes) if tuple(n.output) in ids)
        kept = [n for n in nodes if tuple(n.output) not in ids]
        before = sum(1 for n in nodes[:at] if tuple(n.output) not in ids)
        del self.graph.node[:]
        self.graph.node.extend(kept[:before] + list(new) + kept[before:])
        self.refresh()


def probe_shapes(model: Any, names: Sequence[str], batch: int = 1, seed: int = 0) -> dict[str, tuple]:
    """Concrete shapes (at batch ``batch``) of float tensors of ``model``, by running it once on random
    inputs with those tensors added as outputs (the exported graphs have static shapes but for the
    batch, and ONNX shape inference gives up on the computed ``Resize`` sizes)."""
    import onnx
    import onnxruntime as ort

    m = copy.deepcopy(model)
    have = {o.name for o in m.graph.output}
    wanted = [n for n in dict.fromkeys(names) if n not in have]
    for n in wanted:
        m.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    out = sess.run(None, random_feed(model, batch, seed))
    shapes = {o.name: tuple(v.shape) for o, v in zip(sess.get_outputs(), out, strict=True)}
    return {n: shapes[n] for n in names if n in shapes}


_NP = {1: np.float32, 6: np.int32, 7: np.int64, 9: np.bool_, 10: np.float16}


def random_feed(model: Any, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for ``model``: uniform [0, 1) floats (images, maps), dynamic dimensions set to ``batch``.
    Keypoint-like inputs (last dimension 2) are spread over [-0.8, 0.8] and 2x2 Jacobians near identity,
    so the warps sample inside and outside the image as real frames do."""
    rng = np.random.default_rng(seed)
    feed = {}
    inits = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        t = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in t.shape.dim]
        dtype = _NP.get(t.elem_type, np.float32)
        if dtype == np.float32:
            v = rng.random(shape, dtype=np.float32)
            if shape[-2:] == [2, 2]:
                v = np.eye(2, dtype=np.float32) + 0.2 * (v - 0.5)
            elif shape[-1:] == [2]:
                v = 1.6 * (v - 0.5)
        else:
            v = np.zeros(shape, dtype)
        feed[inp.name] = v
    return feed


# ------------------------------------------------------------------------------------------------ passes


def gather_grid_sample(g: _Graph, shapes: Callable[[Sequence[str]], dict]) -> int:
    """``GridSample`` (bilinear, zero padding) → corner indices and weights once per output pixel, four
    ``Gather`` of whole channel vectors from a channels-last, zero-bordered copy of the input, weighted sum.

    The input gets a zero border (1 before, 2 after) and the sampling position is clipped to [-1, size]:
    a corner outside the image then reads the border (zero), as ``padding_mode="zeros"`` does, and a
    position beyond the border reads two zeros with any weight.
    """
    todo = []
    for n in g.graph.node:
        if n.op_type != "GridSample":
            continue
        a = g.attrs(n)
        if a.get("mode", b"bilinear") not in (b"bilinear", b"linear"):
            continue
        if a.get("padding_mode", b"zeros") != b"zeros":
            continue
        todo.append((n, bool(a.get("align_corners", 0))))
    if not todo:
        return 0
    sh = shapes([x for n, _ in todo for x in n.input])
    count = 0
    for n, align in todo:
        x, grid = n.input
        if len(sh.get(x, ())) != 4 or len(sh.get(grid, ())) != 4:
            continue
        g.replace([n], _GatherSample(g, align).nodes(x, grid, n.output[0], sh[x][1:]))
        count += 1
    return count


class _GatherSample:
    """The node list of one :func:`gather_grid_sample` rewrite."""

    def __init__(self, g: _Graph, align: bool) -> None:
        self.g, self.align, self.new = g, align, []

    def add(self, op: str, inputs: list[str], hint: str, **kw: Any) -> str:
        from onnx import helper

        out = self.g.name(hint)
        self.new.append(helper.make_node(op, inputs, [out], name=out, **kw))
        return out

    def position(self, coord: str, size: int, hint: str) -> str:
        """Normalised coordinate → pixel position, clipped to [-1, size]."""
        g = self.g
        scale, offset = ((size - 1) / 2.0, (size - 1) / 2.0) if self.align else (size / 2.0, (size - 1) / 2.0)
        p = self.add("Mul", [coord, g.const(scale, hint + "_scale")], hint + "_mul")
        p = self.add("Add", [p, g.const(offset, hint + "_off")], hint + "_add")
        return self.add("Clip", [p, g.const(-1.0, hint + "_lo"), g.const(float(size), hint + "_hi")], hint)

    def nodes(self, x: str, grid: str, output: str, chw: tuple[int, int, int]) -> list[Any]:
        from onnx import helper

        g, add = self.g, self.add
        c, h, w = chw
        hp, wp = h + 3, w + 3
        # the input with a zero border, channels last and flat: [N*(H+3)*(W+3), C]
        xp = add("Pad", [x, g.const([0, 0, 1, 1, 0, 0, 2, 2], "gs_pads", np.int64)], "gs_pad")
        xt = add("Transpose", [xp], "gs_nhwc", perm=[0, 2, 3, 1])
        flat = add("Reshape", [xt, g.const([-1, c], "gs_flat_shape", np.int64)], "gs_flat")
        # the grid as two rows [1, P] (P = N*Ho*Wo): ONNX Runtime's element-wise kernels are ~10x slower
        # on shapes that end in a unit dimension ([N, Ho, Wo, 1]) than on the same data as one row
        rows = add(
            "Transpose", [add("Reshape", [grid, g.const([-1, 2], "gs_g2", np.int64)], "gs_g")], "gs_gt"
        )
        gx, gy = g.name("gs_gx"), g.name("gs_gy")
        self.new.append(
            helper.make_node(
                "Split", [rows, g.const([1, 1], "gs_split", np.int64)], [gx, gy], name=gx, axis=0
            )
        )
        ix, iy = self.position(gx, w, "gs_ix"), self.position(gy, h, "gs_iy")
        x0, y0 = add("Floor", [ix], "gs_x0"), add("Floor", [iy], "gs_y0")
        wx1, wy1 = add("Sub", [ix, x0], "gs_wx1"), add("Sub", [iy, y0], "gs_wy1")
        one = g.const(1.0, "gs_one")
        wx0, wy0 = add("Sub", [one, wx1], "gs_wx0"), add("Sub", [one, wy1], "gs_wy0")
        # flat index of the (x0, y0) corner in the bordered input: n*(H+3)*(W+3) + (y0+1)*(W+3) + (x0+1),
        # with n = p // (Ho*Wo) for sample p
        shape = add("Shape", [grid], "gs_shape", start=0, end=3)
        count = add("ReduceProd", [shape], "gs_count", keepdims=0)
        pos = add("Range", [g.const(0, "gs_r0", np.int64), count, g.const(1, "gs_r1", np.int64)], "gs_range")
        per_image = add(
            "ReduceProd", [add("Shape", [grid], "gs_hw", start=1, end=3)], "gs_per_image", keepdims=0
        )
        n = add("Div", [pos, per_image], "gs_n")
        base = add(
            "Cast", [add("Mul", [n, g.const(hp * wp, "gs_img", np.int64)], "gs_base_i")], "gs_base", to=1
        )
        idx = add("Mul", [y0, g.const(float(wp), "gs_row")], "gs_rowoff")
        idx = add("Add", [add("Add", [idx, x0], "gs_idx"), base], "gs_idx_batch")
        # the four corners' indices and weights, stacked: [4, P]
        offs = np.array([0, 1, wp, wp + 1], np.float32).reshape(4, 1) + wp + 1
        idx = add("Add", [idx, g.const(offs, "gs_corners")], "gs_idx4")
        idx = add("Cast", [idx], "gs_idx_i64", to=7)  # exact: the indices are integers below 2^24
        wy = add("Concat", [wy0, wy0, wy1, wy1], "gs_wy", axis=0)
        wx = add("Concat", [wx0, wx1, wx0, wx1], "gs_wx", axis=0)
        wgt = add("Mul", [wy, wx], "gs_w")
        v = add("Gather", [flat, idx], "gs_gather", axis=0)  # [4, P, C]
        v = add("Transpose", [v], "gs_c4p", perm=[2, 0, 1])  # [C, 4, P]
        v = add("Mul", [v, wgt], "gs_wv")
        acc = add("ReduceSum", [v, g.const([1], "gs_sum_axis", np.int64)], "gs_sum", keepdims=0)
        # [C, P] → [N, C, Ho, Wo]
        shape4 = add("Concat", [g.const([c], "gs_c", np.int64), shape], "gs_cshape", axis=0)
        out = add("Reshape", [acc, shape4], "gs_cnhw_out")
        self.new.append(
            helper.make_node("Transpose", [out], [output], name=g.name("gs_nchw"), perm=[1, 0, 2, 3])
        )
        return self.new


def space_to_depth_conv(g: _Graph, shapes: Callable[[Sequence[str]], dict], max_out: int = 4) -> int:
    """A stride-1 'same' convolution with at most ``max_out`` output channels at a high resolution →
    the same convolution on the 2x2 space-to-depth rearrangement of its zero-padded input.

    ``y[o, 2i+a, 2j+b] = sum W[o, c, 2u+r-a, 2v+q-b] * S2D(pad(x))[(2r+q)*C + c, i+u, j+v]``: a conv with
    4x the input and output channels and a ((k+1)/2)² kernel (zeros where a tap falls outside the k×k
    kernel), then ``DepthToSpace`` (CRD) puts output channel ``4o + 2a + b`` at pixel (2i+a, 2j+b). An
    element-wise activation that is the conv's only consumer runs before the ``DepthToSpace``, so ONNX
    Runtime still fuses it into the convolution.
    """
    from onnx import helper, numpy_helper

    todo = []
    for n in g.graph.node:
        if n.op_type != "Conv" or len(n.input) < 2 or n.input[1] not in g.inits:
            continue
        a = g.attrs(n)
        w = numpy_helper.to_array(g.inits[n.input[1]])
        if w.ndim != 4 or w.shape[0] > max_out or w.shape[2] != w.shape[3] or w.shape[2] % 2 == 0:
            continue
        k = w.shape[2]
        p = (k - 1) // 2
        if a.get("group", 1) != 1 or any(s != 1 for s in a.get("strides", [1, 1])):
            continue
        if any(d != 1 for d in a.get("dilations", [1, 1])) or list(a.get("pads", [0] * 4)) != [p] * 4:
            continue
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        todo.append((n, w))
    if not todo:
        return 0
    sh = shapes([n.input[0] for n, _ in todo])
    count = 0
    for n, w in todo:
        s = sh.get(n.input[0], ())
        if len(s) != 4 or s[2] % 2 or s[3] % 2 or s[2] * s[3] < 64 * 64:
            continue
        co, ci, k, _ = w.shape
        p, kk = (k - 1) // 2, (k + 1) // 2
        w2 = np.zeros((co * 4, ci * 4, kk, kk), np.float32)
        for a_ in range(2):
            for b_ in range(2):
                for r in range(2):
                    for q in range(2):
                        for u in range(kk):
                            for v in range(kk):
                                i, j = 2 * u + r - a_, 2 * v + q - b_
                                if 0 <= i < k and 0 <= j < k:
                                    w2[a_ * 2 + b_ :: 4, (r * 2 + q) * ci : (r * 2 + q + 1) * ci, u, v] = w[
                                        :, :, i, j
                                    ]
        inputs = [None, g.const(w2, "s2d_weight")]
        if len(n.input) > 2 and n.input[2]:
            bias = g.value(n.input[2])
            if bias is None:
                continue
            inputs.append(g.const(np.repeat(bias.astype(np.float32), 4), "s2d_bias"))
        consumers = g.consumers.get(n.output[0], [])
        act = None
        if (
            len(consumers) == 1
            and consumers[0].op_type in ("Sigmoid", "Relu", "Tanh")
            and n.output[0] not in g.outputs
        ):
            act = consumers[0]
        new = []
        pad = g.name("s2d_pad")
        new.append(
            helper.make_node(
                "Pad", [n.input[0], g.const([0, 0, p, p, 0, 0, p, p], "s2d_pads", np.int64)], [pad], name=pad
            )
        )
        s2d = g.name("s2d")
        new.append(helper.make_node("SpaceToDepth", [pad], [s2d], name=s2d, blocksize=2))
        inputs[0] = s2d
        conv = g.name("s2d_conv")
        new.append(helper.make_node("Conv", inputs, [conv], name=n.name or conv, kernel_shape=[kk, kk]))
        last, final = conv, n.output[0]
        if act is not None:
            last = g.name("s2d_act")
            new.append(helper.make_node(act.op_type, [conv], [last], name=act.name or last))
            final = act.output[0]
        new.append(
            helper.make_node("DepthToSpace", [last], [final], name=g.name("d2s"), blocksize=2, mode="CRD")
        )
        g.replace([n] + ([act] if act is not None else []), new)
        count += 1
    return count


def pixel_matmul(g: _Graph, shapes: Callable[[Sequence[str]], dict]) -> int:
    """``MatMul(A, B)`` that applies one small matrix per leading index to a column vector at every
    pixel (A ``[b..., 1..., m, n]`` broadcast over B ``[b..., S..., n, 1]``: a keypoint's Jacobian
    applied to the whole motion grid) → one ``MatMul`` of the pixels as rows, ``[b..., S, n] @ Aᵀ``:
    a few GEMMs with many rows instead of one tiny product per pixel. Only reshapes around it."""
    from onnx import helper

    mms = [n for n in g.graph.node if n.op_type == "MatMul"]
    if not mms:
        return 0
    sh = shapes([i for n in mms for i in [*n.input, n.output[0]]])
    count = 0
    for node in mms:
        a, b = (sh.get(i, ()) for i in node.input)
        if len(a) != len(b) or len(a) < 3 or b[-1] != 1 or a[-1] != b[-2]:
            continue
        m, n = a[-2], a[-1]
        lead = 0  # batch dimensions A and B share
        while lead < len(a) - 2 and a[lead] == b[lead]:
            lead += 1
        spatial = b[lead:-2]
        if not spatial or any(d != 1 for d in a[lead:-2]) or int(np.prod(spatial)) < 16 or max(m, n) > 8:
            continue
        nm = g.name
        rows, mat, mat_t, prod = nm("pm_rows"), nm("pm_mat"), nm("pm_mat_t"), nm("pm_prod")
        keep = [0] * lead  # Reshape's 0: copy the dimension (the dynamic batch among them)
        perm = [*range(lead), lead + 1, lead]
        new = [
            helper.make_node(
                "Reshape", [node.input[1], g.const([*keep, -1, n], "pm_rs", np.int64)], [rows], name=rows
            ),
            helper.make_node(
                "Reshape", [node.input[0], g.const([*keep, m, n], "pm_ms", np.int64)], [mat], name=mat
            ),
            helper.make_node("Transpose", [mat], [mat_t], name=mat_t, perm=perm),
            helper.make_node("MatMul", [rows, mat_t], [prod], name=node.name or prod),
            helper.make_node(
                "Reshape",
                [prod, g.const([*keep, *spatial, m, 1], "pm_os", np.int64)],
                [node.output[0]],
                name=nm("pm_out"),
            ),
        ]
        g.replace([node], new)
        count += 1
    return count


def strided_conv_slice(g: _Graph, shapes: Callable[[Sequence[str]], dict]) -> int:
    """``Conv`` (stride 1) whose only use is ``Slice`` with step s from 0 to the end along both spatial
    axes → the conv with stride s (it computes exactly the pixels the slices kept)."""
    from onnx import helper

    cands = [
        n
        for n in g.graph.node
        if n.op_type == "Conv" and all(s == 1 for s in g.attrs(n).get("strides", [1, 1]))
    ]
    sh = shapes([n.output[0] for n in cands])
    count = 0
    for n in cands:
        size = sh.get(n.output[0], ())
        if len(size) != 4:
            continue
        chain: list[Any] = []
        steps: dict[int, int] = {}
        out = n.output[0]
        while out not in g.outputs:
            cons = g.consumers.get(out, [])
            if len(cons) != 1 or cons[0].op_type != "Slice" or len(cons[0].input) < 5:
                break
            sl = cons[0]
            starts, ends, axes, st = (g.value(sl.input[i]) for i in (1, 2, 3, 4))
            if any(v is None for v in (starts, ends, axes, st)):
                break
            axes = [int(a) % 4 for a in axes.tolist()]
            if np.any(starts != 0) or any(int(e) < size[a] for e, a in zip(ends.tolist(), axes, strict=True)):
                break
            if any(a not in (2, 3) for a in axes):
                break
            steps.update(zip(axes, (int(s) for s in st.tolist()), strict=True))
            chain.append(sl)
            out = sl.output[0]
        if not chain or set(steps) != {2, 3} or steps[2] != steps[3] or steps[2] < 2:
            continue
        a = g.attrs(n)
        a["strides"] = [steps[2], steps[3]]
        g.replace([n, *chain], [helper.make_node("Conv", list(n.input), [out], name=n.name, **a)])
        count += 1
    return count


def fuse_sibling_convs(g: _Graph, shapes: Callable[[Sequence[str]], dict], narrow: int = 8) -> int:
    """Convolutions that read the same tensor with the same geometry (kernel, strides, pads, dilations,
    group 1, constant weights), one of them with fewer than ``narrow`` output channels → one
    convolution over the concatenated weights and a ``Split``.

    Only a narrow conv is worth it: ONNX Runtime pads a conv's output channels to its 8-channel block,
    so a 1-channel head (the occlusion map) costs as much as an 8-channel one, and fused into its
    16-channel sibling (the motion mask) it rides in the padding. Wide siblings gain nothing measurable
    (docs/export.md), and fused they would share one activation scale in int8 (measured: the attention's
    key and value convs fused cost the int8 frames 2 dB)."""
    from onnx import helper, numpy_helper

    count = 0
    done: set[str] = set()
    for tensor in list(g.consumers):
        if tensor in done:
            continue
        convs = [
            n
            for n in g.consumers.get(tensor, [])
            if n.op_type == "Conv" and n.input[0] == tensor and n.input[1] in g.inits
            and g.attrs(n).get("group", 1) == 1
        ]  # fmt: skip
        groups: dict[str, list[Any]] = {}
        for n in convs:
            key = json.dumps({k: v for k, v in sorted(g.attrs(n).items())}, default=str)
            groups.setdefault(key, []).append(n)
        for same in groups.values():
            if len(same) < 2:
                continue
            ws = [numpy_helper.to_array(g.inits[n.input[1]]) for n in same]
            if min(w.shape[0] for w in ws) >= narrow:
                continue
            bs = []
            for n, w in zip(same, ws, strict=True):
                b = (
                    g.value(n.input[2])
                    if len(n.input) > 2 and n.input[2]
                    else np.zeros(w.shape[0], np.float32)
                )
                bs.append(b)
            if any(b is None for b in bs):
                continue
            fused = g.name("fused_conv")
            a = g.attrs(same[0])
            conv = helper.make_node(
                "Conv",
                [tensor, g.const(np.concatenate(ws), "fused_w"), g.const(np.concatenate(bs), "fused_b")],
                [fused],
                name=fused,
                **a,
            )
            split = helper.make_node(
                "Split",
                [fused, g.const([w.shape[0] for w in ws], "fused_split", np.int64)],
                [n.output[0] for n in same],
                name=g.name("fused_split"),
                axis=1,
            )
            g.replace(same, [conv, split])
            count += 1
        done.add(tensor)
    return count


PASS_FUNCTIONS: dict[str, Callable[[_Graph, Callable], int]] = {
    "gather_grid_sample": gather_grid_sample,
    "space_to_depth_conv": space_to_depth_conv,
    "pixel_matmul": pixel_matmul,
    "strided_conv_slice": strided_conv_slice,
    "fuse_sibling_convs": fuse_sibling_convs,
}


def _run(model: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def max_difference(a: Any, b: Any, batch: int = 2, seed: int = 1) -> float:
    """Largest absolute difference between the outputs of two graphs with the same inputs."""
    feed = random_feed(a, batch, seed)
    return max(
        float(np.max(np.abs(x.astype(np.float64) - y)))
        for x, y in zip(_run(a, feed), _run(b, feed), strict=True)
    )


def optimize_model(
    model: Any, passes: Sequence[str] = PASSES, check: bool = True
) -> tuple[Any, dict[str, Any]]:
    """Apply ``passes`` (names from :data:`PASSES`) to a copy of ``model``; returns it and a report
    (per pass: rewrites made and the max abs output difference against the graph before it). A pass whose
    result differs by more than :data:`TOLERANCE` is dropped (and reported), never kept."""
    import onnx

    bad = sorted(set(passes) - set(PASS_FUNCTIONS))
    if bad:
        raise ExportError(f"unknown graph pass(es) {', '.join(bad)}; choose from {', '.join(PASSES)}")
    current = copy.deepcopy(model)
    report: dict[str, Any] = {}
    for name in PASSES:
        if name not in passes:
            continue
        candidate = copy.deepcopy(current)
        before = current
        n = PASS_FUNCTIONS[name](_Graph(candidate), lambda names, m=before: probe_shapes(m, names))
        if not n:
            report[name] = {"rewrites": 0}
            continue
        onnx.checker.check_model(candidate)
        diff = max_difference(current, candidate) if check else None
        entry = {"rewrites": n, "max_abs_diff": diff}
        if diff is not None and not diff <= TOLERANCE:
            entry["dropped"] = f"output differs by {diff:.2e} > {TOLERANCE:g}"
        else:
            current = candidate
        report[name] = entry
    return current, report


#: The graphs that run per frame: the fused ``frame`` graph, and the split path a stream with steadied
#: keypoints runs instead (``depth`` → ``keypoints`` → host filter → ``generator``, engine/hot_path.py).
#: ``source_encoder`` runs once per photo and is copied as it is.
PER_FRAME_GRAPHS = ("frame", "generator", "depth", "keypoints")


def optimize_export(
    onnx_dir: str | Path, out_dir: str | Path, passes: Sequence[str] = PASSES, progress: bool = False
) -> dict[str, Any]:
    """Write a copy of an fp32 export with its per-frame graphs (:data:`PER_FRAME_GRAPHS`) optimized for
    ONNX Runtime's CPU provider (``source_encoder``, run once per photo, is copied); returns the new
    manifest, whose ``"cpu_graph"`` entry lists the passes and, per graph, what each changed."""
    import onnx

    src, out = Path(onnx_dir), Path(out_dir)
    manifest = read_manifest(src)
    if manifest.get("precision", "fp32") != "fp32":
        raise ExportError(f"{src} is a {manifest['precision']} export; optimize the fp32 export")
    if manifest.get("cpu_graph"):
        raise ExportError(f"{src} is already optimized ({', '.join(manifest['cpu_graph']['passes'])})")
    if out.resolve() == src.resolve():
        raise ExportError("--out must be a new directory, not the export itself")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    reports: dict[str, Any] = {}
    for graph, entry in manifest["graphs"].items():
        if graph not in PER_FRAME_GRAPHS:
            shutil.copy2(src / entry["file"], out / entry["file"])
            continue
        if progress:
            print(f"optimizing the {graph} graph for the CPU ({', '.join(passes)}) …", flush=True)
        model, reports[graph] = optimize_model(onnx.load(str(src / entry["file"])), passes)
        onnx.save(model, str(out / entry["file"]))
        entry.update({"nodes": len(model.graph.node), "ops": sorted({n.op_type for n in model.graph.node})})
    applied = {p for r in reports.values() for p, e in r.items() if e.get("rewrites") and "dropped" not in e}
    manifest["cpu_graph"] = {
        "source": str(src),
        "passes": [p for p in passes if p in applied],
        "report": reports.get("frame", {}),
        "reports": reports,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    copy_lid_reader(src, out, manifest)
    atomic_write(out / MANIFEST, lambda p: Path(p).write_text(json.dumps(manifest, indent=2)))
    return manifest
