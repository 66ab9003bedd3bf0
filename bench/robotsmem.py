"""Redis memory of the robots.txt cache per site, on the sample's sites and a realistic mix of robots.txt files.

    python3 bench/robotsmem.py [--parquet tests/data/laion_sample_10000.parquet] [--seed 1]

Every distinct site (scheme, host, port) of the sample's URLs is given a robots.txt drawn from MIX: no file (404),
the defaults of common site software (WordPress, Shopify with its store id, Blogger, Squarespace, Wix, Drupal,
Joomla), a file that shuts everything, one that names img2dataset, and custom files of 3-40 site-specific rules (a
tenth with a Crawl-delay). Each is kept as the workers keep it (``laion5b.robots``: our groups only, compact, with the
key name and TTL of a real run) in a redis-server of its own; the script prints MEMORY USAGE per key (mean, median,
largest) by kind and overall, and ``used_memory`` grown per site (which also counts the TTL's entry).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pyarrow.parquet as pq  # noqa: E402

from laion5b.keys import Keys  # noqa: E402
from laion5b.robots import encode, origin_of, site_rules  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

AGENTS = ("laion5b-downloader", "img2dataset")
TTL_MS = 86_400_000
WORDPRESS = "User-agent: *\nDisallow: /wp-admin/\nAllow: /wp-admin/admin-ajax.php\n\nSitemap: {site}/wp-sitemap.xml\n"
SHOPIFY = """User-agent: *
Disallow: /a/downloads/-/*
Disallow: /admin
Disallow: /cart
Disallow: /orders
Disallow: /checkouts/
Disallow: /checkout
Disallow: /{store}/checkouts
Disallow: /{store}/orders
Disallow: /carts
Disallow: /account
Disallow: /collections/*sort_by*
Disallow: /*/collections/*sort_by*
Disallow: /collections/*+*
Disallow: /collections/*%2B*
Disallow: /collections/*%2b*
Disallow: /*/collections/*+*
Disallow: /*/collections/*%2B*
Disallow: /*/collections/*%2b*
Disallow: */collections/*filter*&*filter*
Disallow: /blogs/*+*
Disallow: /blogs/*%2B*
Disallow: /blogs/*%2b*
Disallow: /*/blogs/*+*
Disallow: /*/blogs/*%2B*
Disallow: /*/blogs/*%2b*
Disallow: /*?*oseid=*
Disallow: /*preview_theme_id*
Disallow: /*preview_script_id*
Disallow: /policies/
Disallow: /*/policies/
Disallow: /*/*?*ls=*&ls=*
Disallow: /*/*?*ls%3D*%3Fls%3D*
Disallow: /*/*?*ls%3d*%3fls%3d*
Disallow: /search
Disallow: /apple-app-site-association
Disallow: /.well-known/shopify/monorail
Disallow: /cdn/wpm/*.js
Disallow: /recommendations/products
Disallow: /*/recommendations/products
Sitemap: {site}/sitemap.xml

User-agent: adsbot-google
Disallow: /checkouts/
Disallow: /checkout
Disallow: /carts
Disallow: /orders

User-agent: Nutch
Disallow: /

User-agent: AhrefsBot
Crawl-delay: 10
Disallow: /

User-agent: Pinterest
Crawl-delay: 1
"""
BLOGGER = "User-agent: Mediapartners-Google\nDisallow: \n\nUser-agent: *\nDisallow: /search\nAllow: /\n"
SQUARESPACE = (
    "User-agent: *\nDisallow: /config\nDisallow: /search\nDisallow: /account$\nDisallow: /account/\n"
    "Disallow: /commerce/digital-download/\nDisallow: /api/\nAllow: /api/ui-extensions/\nDisallow: /static/\n"
    + "".join(
        f"Disallow:/*{sep}{name}\n"
        for name in (
            "author=*",
            "tag=*",
            "month=*",
            "view=*",
            "format=json",
            "format=page-context",
            "format=main-content",
            "format=json-pretty",
            "format=ical",
            "reversePaginate=*",
        )
        for sep in "?&"
    )
    + "\nUser-agent: GPTBot\nDisallow: /\n\nUser-agent: CCBot\nDisallow: /\n"
)
WIX = "User-agent: *\nAllow: /\nDisallow: *?lightbox=\n\nUser-agent: PetalBot\nDisallow: /\n"
DRUPAL = (
    "User-agent: *\n"
    + "".join(
        f"Allow: /{folder}/*.{ext}\n" for folder in ("core", "profiles") for ext in ("css$", "js$", "gif", "jpg", "png")
    )
    + "".join(
        f"Disallow: {path}\n"
        for path in (
            "/core/",
            "/profiles/",
            "/README.md",
            "/web.config",
            "/admin/",
            "/comment/reply/",
            "/filter/tips",
            "/node/add/",
            "/search/",
            "/user/register",
            "/user/password",
            "/user/login",
            "/user/logout",
            "/media/oembed",
            "/index.php/admin/",
            "/index.php/comment/reply/",
            "/index.php/user/login",
        )
    )
)
JOOMLA = "User-agent: *\n" + "".join(
    f"Disallow: /{folder}/\n"
    for folder in (
        "administrator",
        "api",
        "bin",
        "cache",
        "cli",
        "components",
        "includes",
        "installation",
        "language",
        "layouts",
        "libraries",
        "logs",
        "modules",
        "plugins",
        "tmp",
    )
)
CLOSED = "User-agent: *\nDisallow: /\n"
NAMES_US = "User-agent: GPTBot\nUser-agent: CCBot\nUser-agent: img2dataset\nDisallow: /\n\nUser-agent: *\nAllow: /\n"
WORDS = [
    "images",
    "media",
    "photos",
    "gallery",
    "shop",
    "products",
    "blog",
    "news",
    "archive",
    "tags",
    "category",
    "private",
    "admin",
    "login",
    "user",
]
MIX = [  # (kind, share): an estimate, not a survey; say so wherever its figure is quoted
    ("no robots.txt (404)", 0.20),
    ("WordPress", 0.28),
    ("custom", 0.25),
    ("Shopify", 0.08),
    ("Blogger", 0.05),
    ("Squarespace", 0.03),
    ("Wix", 0.03),
    ("Drupal", 0.02),
    ("Joomla", 0.02),
    ("shuts everything", 0.02),
    ("names img2dataset", 0.02),
]


def custom(rng: random.Random) -> str:
    """A site's own file: 3-40 rules from common words and names of its own, a tenth with a Crawl-delay."""
    lines = ["User-agent: *"]
    for _ in range(rng.randint(3, 40)):
        path = "/".join(rng.choice(WORDS) if rng.random() < 0.6 else f"{rng.getrandbits(24):x}" for _ in range(2))
        lines.append(f"{rng.choice(('Disallow', 'Disallow', 'Allow'))}: /{path}{rng.choice(('/', '', '*', '$'))}")
    if rng.random() < 0.1:
        lines.append(f"Crawl-delay: {rng.choice((1, 2, 5, 10))}")
    return "\n".join(lines) + "\n"


def robots_txt(kind: str, site: str, rng: random.Random) -> str | None:
    templates = {
        "WordPress": WORDPRESS,
        "Blogger": BLOGGER,
        "Squarespace": SQUARESPACE,
        "Wix": WIX,
        "Drupal": DRUPAL,
        "Joomla": JOOMLA,
        "shuts everything": CLOSED,
        "names img2dataset": NAMES_US,
    }
    if kind == "no robots.txt (404)":
        return None
    if kind == "Shopify":
        return SHOPIFY.format(store=rng.randint(10**7, 10**11), site=site)
    if kind == "custom":
        return custom(rng)
    return templates[kind].format(site=site)


def sites_of(parquet: Path) -> list[str]:
    urls = pq.read_table(parquet, columns=["URL"]).column("URL").to_pylist()
    return sorted({origin for url in urls if url and (origin := origin_of(url))})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parquet", type=Path, default=ROOT / "tests" / "data" / "laion_sample_10000.parquet")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    sites = sites_of(args.parquet)
    keys = Keys()
    kinds, shares = zip(*MIX, strict=True)
    with tempfile.TemporaryDirectory(prefix="robotsmem-") as folder:
        server = RedisServer(Path(folder))
        server.start()
        try:
            client = server.client()
            before = int(client.info("memory")["used_memory"])
            sizes: dict[str, list[int]] = defaultdict(list)
            values: dict[str, list[int]] = defaultdict(list)
            for site in sites:
                kind = rng.choices(kinds, shares)[0]
                text = robots_txt(kind, site, rng)
                value = encode(site_rules(text or "", AGENTS))
                client.set(keys.robots(site), value, px=TTL_MS)
                sizes[kind].append(int(client.memory_usage(keys.robots(site), samples=0)))
                values[kind].append(len(value))
            grown = int(client.info("memory")["used_memory"]) - before
        finally:
            server.stop()
    print(f"{len(sites):,} sites of {args.parquet.name}; MEMORY USAGE per key in bytes (value bytes in brackets)")
    print(f"{'kind':<22} {'sites':>6} {'mean':>6} {'median':>6} {'max':>6}  {'value mean':>10}")
    every = [size for kind in sizes for size in sizes[kind]]
    for kind in [*kinds, "all"]:
        row = every if kind == "all" else sizes.get(kind, [])
        value = [v for k in values for v in values[k]] if kind == "all" else values.get(kind, [])
        if row:
            print(
                f"{kind:<22} {len(row):>6} {statistics.mean(row):>6.0f} {statistics.median(row):>6.0f} "
                f"{max(row):>6}  {statistics.mean(value):>10.1f}"
            )
    print(f"used_memory grown per site (keys, values, TTL entries, dict growth): {grown / len(sites):.0f} bytes")


if __name__ == "__main__":
    main()
