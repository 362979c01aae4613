"""Reports as a list of blocks, written twice: a self-contained HTML page and Markdown.

    report = Report("Title")
    report.heading("Section"); report.text("..."); report.table(headers, rows)
    report.figure("bars", fig)          # a matplotlib figure -> bars.png
    report.write(out)                   # out/index.html, out/report.md, out/*.png

index.html has inline CSS and its PNGs as base64 data URIs: one file that opens anywhere
without a network (no scripts, no fonts or styles from the internet). report.md links the
PNG files next to it.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

from gptkit.fileio import atomic_write, atomic_write_text

CSS = """body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.6em}table{border-collapse:collapse;margin:.8em 0;font-size:.92em}th,td{border:1px solid #ccc;
padding:.3em .6em;text-align:right;vertical-align:top}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
td.text{text-align:left;white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:.88em;max-width:420px}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}pre{background:#f6f6f6;padding:.6em;overflow-x:auto}
p.note{color:#555;font-size:.92em}"""
# CJK fonts matplotlib may find, most preferred first: Chinese labels render instead of boxes
CJK_FONTS = ["/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
             "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc", "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
             "/usr/share/fonts/truetype/arphic/uming.ttc"]


@dataclass
class Report:
    title: str
    blocks: list[tuple] = field(default_factory=list)
    images: dict[str, bytes] = field(default_factory=dict)

    def heading(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def text(self, text: str, note: bool = False) -> None:
        self.blocks.append(("p", text, note))

    def code(self, text: str) -> None:
        self.blocks.append(("pre", text))

    def table(self, headers: list[str], rows: list[list], text_columns: tuple[int, ...] = ()) -> None:
        """text_columns: columns of free text (left-aligned, wrapped, monospace in HTML)."""
        self.blocks.append(("table", headers, [[str(c) for c in r] for r in rows], text_columns))

    def figure(self, name: str, fig) -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(fig)
        self.images[f"{name}.png"] = buf.getvalue()
        self.blocks.append(("img", f"{name}.png"))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, *rest in self.blocks:
            if kind == "h2":
                out += [f"## {rest[0]}", ""]
            elif kind == "p":
                out += [f"_{rest[0]}_" if rest[1] else rest[0], ""]
            elif kind == "pre":
                out += ["```", rest[0], "```", ""]
            elif kind == "img":
                out += [f"![{rest[0]}]({rest[0]})", ""]
            else:
                headers, rows, _ = rest
                out += ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
                out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows] + [""]
        return "\n".join(out)

    def html(self) -> str:
        e = html.escape
        out = ["<!doctype html>", '<html><head><meta charset="utf-8">', f"<title>{e(self.title)}</title>",
               f"<style>{CSS}</style></head><body>", f"<h1>{e(self.title)}</h1>"]
        for kind, *rest in self.blocks:
            if kind == "h2":
                out.append(f"<h2>{e(rest[0])}</h2>")
            elif kind == "p":
                out.append(f'<p class="note">{e(rest[0])}</p>' if rest[1] else f"<p>{e(rest[0])}</p>")
            elif kind == "pre":
                out.append(f"<pre>{e(rest[0])}</pre>")
            elif kind == "img":
                data = base64.b64encode(self.images[rest[0]]).decode("ascii")
                out.append(f'<img alt="{e(rest[0])}" src="data:image/png;base64,{data}">')
            else:
                headers, rows, text_cols = rest
                out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in headers) + "</tr>")
                for r in rows:
                    cells = (f'<td class="text">{e(c)}</td>' if i in text_cols else f"<td>{e(c)}</td>"
                             for i, c in enumerate(r))
                    out.append("<tr>" + "".join(cells) + "</tr>")
                out.append("</table>")
        return "\n".join(out + ["</body></html>", ""])

    def write(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for name, data in self.images.items():
            atomic_write(out / name, lambda tmp, data=data: Path(tmp).write_bytes(data))
        atomic_write_text(out / "report.md", self.markdown())
        atomic_write_text(out / "index.html", self.html())
        return out


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ⏎ ")


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display), with a CJK font when one is installed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import font_manager

    for path in CJK_FONTS:
        if Path(path).is_file():
            font_manager.fontManager.addfont(path)
            name = font_manager.FontProperties(fname=path).get_name()
            plt.rcParams["font.sans-serif"] = [name, "DejaVu Sans"]
            plt.rcParams["axes.unicode_minus"] = False
            break
    return plt
