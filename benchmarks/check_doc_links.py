"""Check every relative link (and #anchor) in README.md and docs/*.md resolves."""
import glob, os, re, sys
def slug(h):
    h = h.strip().lower()
    h = re.sub(r'[^\w\- ]', '', h)
    return h.replace(' ', '-')
def anchors(path):
    out, fence = set(), False
    for line in open(path, encoding='utf-8'):
        if line.startswith('```'): fence = not fence
        if not fence and line.startswith('#'):
            out.add(slug(line.lstrip('#')))
    return out
bad = 0
for md in ['README.md'] + sorted(glob.glob('docs/*.md')):
    text = re.sub(r'```.*?```', '', open(md, encoding='utf-8').read(), flags=re.S)
    for target in re.findall(r'\]\(([^)\s]+)\)', text):
        if re.match(r'[a-z]+:', target): continue
        path, _, frag = target.partition('#')
        full = os.path.normpath(os.path.join(os.path.dirname(md), path)) if path else md
        if not os.path.exists(full):
            print(f'{md}: missing {target}'); bad += 1; continue
        if frag and full.endswith('.md') and frag not in anchors(full):
            print(f'{md}: no anchor {target}'); bad += 1
print('bad links:', bad); sys.exit(bool(bad))
