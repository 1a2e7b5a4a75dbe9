"""Reading back an influence page (``fipo_trl.tools.influence.render_influence_html``) in tests: the trainer, the demo
and the long-reasoning study check their pages against the weights they computed."""

import html.parser


def read_influence_html(page: str) -> list[list[tuple[float, float, str]]]:
    """The inverse of ``render_influence_html``: per completion, (f, F, CSS style) of every token span."""

    class _Spans(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.rows: list[list[tuple[float, float, str]]] = []

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "div" and attrs.get("class") == "completion":
                self.rows.append([])
            elif tag == "span" and attrs.get("class") == "tok":
                self.rows[-1].append((float(attrs["data-weight"]), float(attrs["data-future-kl"]), attrs["style"]))

    parser = _Spans()
    parser.feed(page)
    return parser.rows
