// Render TeX to HTML with KaTeX for the docs build (docs/hooks/katex.py calls this once per page).
// stdin: a JSON list of [tex, displayMode]; stdout: a JSON list of HTML strings, in the same order.
// A formula KaTeX cannot parse ends the build with its message: the site never shows raw TeX.
const katex = require("katex");

let input = "";
process.stdin.setEncoding("utf8");
process.stdin.on("data", (chunk) => (input += chunk));
process.stdin.on("end", () => {
  const formulas = JSON.parse(input);
  const html = formulas.map(([tex, displayMode]) => {
    try {
      return katex.renderToString(tex, { displayMode, throwOnError: true, output: "html" });
    } catch (error) {
      process.stderr.write(`KaTeX cannot render ${JSON.stringify(tex)}: ${error.message}\n`);
      process.exit(1);
    }
  });
  process.stdout.write(JSON.stringify(html));
});
