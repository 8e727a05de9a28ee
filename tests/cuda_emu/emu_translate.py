"""Source translation for the CUDA emulator (tests/cuda_emu): csrc/cuda/*.cu -> C++.

The kernels compile as C++ against the headers of ``tests/cuda_emu/include`` (stand-ins
for cuda_runtime.h, cuda_fp16.h, cuda_bf16.h and the cub parts used). Four constructs of
CUDA C++ are not C++ and are rewritten here, nothing else:

- ``kernel<<<grid, block, smem, stream>>>(args)`` ->
  ``::vos_emu::launch("kernel", kernel, grid, block, smem, stream)(args)``;
- ``extern __shared__ __align__(16) T name[];`` -> ``T* name = (T*)dynamic_smem();``;
- ``__shared__ __align__(16) T name[N];`` -> ``auto& name = block_shared<T[N], 16>(key);``,
  storage of the block being run (a C++ ``static`` would be one for every block), ``key``
  an address unique to the declaration;
- inline PTX: ``asm volatile("mnemonic ops;" : outputs : inputs)`` ->
  ``::vos_emu::ptx::mnemonic("template", operands...)``, the operands in the order the
  template names them (``{%0,%1}`` groups flattened, ``[%0]`` addresses unwrapped,
  immediates passed as numbers); runtime.h implements each mnemonic the kernels use, so
  an unknown one fails to compile.

The ATen glue (*_glue.cpp) registers its kernels at the CPU dispatch key instead of CUDA,
replacing the CPU C++ kernels of those ops in the process that loads the emulator build
(glue.h takes CPU tensors and a null stream when ``VOS_CUDA_EMU`` is defined).
"""
from __future__ import annotations

import re
import sys


def _match_back_angle(s: str, end: int) -> int:
    """Index of the '<' matching the '>' at s[end]."""
    depth = 0
    for i in range(end, -1, -1):
        if s[i] == ">":
            depth += 1
        elif s[i] == "<":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError("unbalanced template arguments before <<<")


def _string_end(s: str, i: int) -> int:
    """Index of the '"' closing the string literal that opens at s[i]."""
    j = i + 1
    while s[j] != '"':
        j += 2 if s[j] == "\\" else 1
    return j


def _match_paren(s: str, start: int) -> int:
    """Index of the ')' matching the '(' at s[start] (string literals skipped)."""
    depth, i = 0, start
    while i < len(s):
        c = s[i]
        if c == '"':
            i = _string_end(s, i)
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ValueError("unbalanced parentheses")


def translate_launches(s: str) -> str:
    out, pos = [], 0
    while True:
        i = s.find("<<<", pos)
        if i < 0:
            out.append(s[pos:])
            return "".join(out)
        j = s.index(">>>", i)
        k = i - 1
        if s[k] == ">":
            k = _match_back_angle(s, k) - 1
        while k >= 0 and (s[k].isalnum() or s[k] in "_:"):
            k -= 1
        kernel, config = s[k + 1:i], s[i + 3:j]
        if not kernel or not s[j + 3:].lstrip().startswith("("):
            raise ValueError(f"cannot parse the launch near: {s[k + 1:j + 4]!r}")
        out.append(s[pos:k + 1])
        name = " ".join(kernel.split())
        out.append(f'::vos_emu::launch("{name}", {kernel}, {config})')
        pos = j + 3


_EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([A-Za-z_][\w:<>, ]*?)\s+(\w+)\s*\[\s*\]\s*;")


def translate_extern_shared(s: str) -> str:
    return _EXTERN_SHARED.sub(
        lambda m: f"{m[1]}* {m[2]} = reinterpret_cast<{m[1]}*>(::vos_emu::dynamic_smem());", s)


# a static __shared__ declaration: optional __align__(n), the type, the name, array extents
_STATIC_SHARED = re.compile(
    r"(?<!\w)__shared__\s+(?:__align__\(\s*(\d+)\s*\)\s+)?((?:typename\s+)?[A-Za-z_][\w:<>, ]*?)\s+(\w+)\s*"
    r"((?:\[[^\[\];]+\]\s*)*);")
# one address per declaration (and per template instantiation): a function-local static
_SHARED_KEY = "[]() -> const void* { static const char key = 0; return &key; }()"


def translate_static_shared(s: str) -> str:
    def one(m: re.Match) -> str:
        ty = f"{m[2].strip()}{m[4].strip()}"
        return f"auto& {m[3]} = ::vos_emu::block_shared<{ty}, {m[1] or 0}>({_SHARED_KEY});"

    return _STATIC_SHARED.sub(one, s)


def _split_top(s: str, sep: str) -> list[str]:
    """Split at `sep` outside parentheses, brackets, braces and string literals."""
    parts, depth, cur, i = [], 0, [], 0
    while i < len(s):
        c = s[i]
        if c == '"':
            j = _string_end(s, i)
            cur.append(s[i:j + 1])
            i = j + 1
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


_OPERAND = re.compile(r'^\s*"([=+&]*)[a-z]+"\s*\((.*)\)\s*$', re.S)


def _operands(section: str) -> list[str]:
    if not section.strip():
        return []
    exprs = []
    for part in _split_top(section, ","):
        m = _OPERAND.match(part)
        if not m:
            raise ValueError(f"cannot parse the asm operand {part!r}")
        exprs.append(m[2].strip())
    return exprs


def _asm_call(body: str) -> str:
    sections = _split_top(body, ":")
    template = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', sections[0]))
    template = template.replace("\\n", " ").replace("\\t", " ").strip()
    operands = _operands(sections[1]) if len(sections) > 1 else []
    operands += _operands(sections[2]) if len(sections) > 2 else []
    stmt = template.rstrip(";").strip()
    if ";" in stmt:
        raise ValueError(f"one instruction per asm statement: {template!r}")
    mnemonic, _, rest = stmt.partition(" ")
    args = []
    for group in _split_top(rest, ",") if rest.strip() else []:
        for item in group.strip().strip("{}[]").split(","):
            item = item.strip()
            if re.fullmatch(r"%\d+", item):
                args.append(f"({operands[int(item[1:])]})")
            elif re.fullmatch(r"-?\d+", item):
                args.append(item)
            else:
                raise ValueError(f"cannot translate the PTX operand {item!r} of {template!r}")
    name = re.sub(r"[^\w]", "_", mnemonic)
    return f'::vos_emu::ptx::{name}({", ".join([repr_c(template)] + args)})'


def repr_c(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


_ASM = re.compile(r"\basm\s*(?:volatile\s*)?\(")


def translate_asm(s: str) -> str:
    out, pos = [], 0
    for m in _ASM.finditer(s):
        if m.start() < pos:
            continue
        open_paren = m.end() - 1
        close = _match_paren(s, open_paren)
        out.append(s[pos:m.start()])
        out.append(_asm_call(s[open_paren + 1:close]))
        out.append("\n" * s.count("\n", m.start(), close))  # keep the line numbers
        pos = close + 1
    out.append(s[pos:])
    return "".join(out)


def translate_cu(s: str) -> str:
    return translate_asm(translate_static_shared(translate_extern_shared(translate_launches(s))))


_IMPL = re.compile(r"TORCH_LIBRARY_IMPL\(\s*vos_kernels\s*,\s*CUDA\s*,")


def translate_glue(s: str) -> str:
    out, n = _IMPL.subn("TORCH_LIBRARY_IMPL(vos_kernels, CPU,", s)
    if n == 0:
        raise ValueError("no TORCH_LIBRARY_IMPL(vos_kernels, CUDA, ...) in the glue")
    return out


def main(argv: list[str]) -> int:
    src, dst = argv[1], argv[2]
    with open(src) as f:
        text = f.read()
    text = translate_cu(text) if src.endswith(".cu") else translate_glue(text)
    with open(dst, "w") as f:
        f.write(f'#line 1 "{src}"\n' if src.endswith(".cu") else "")
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
