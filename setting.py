"""Settings of laion5b-downloader.

Edit the values here, or override any of them with an environment variable named ``LAION_`` + the setting's name
upper-cased (``LAION_REDIS_IP``, ``LAION_THREAD_NUM``, ...). Keep secrets such as ``redis_pass`` out of this file:
set ``LAION_REDIS_PASS`` in the environment instead. Lists are comma-separated, booleans accept 1/0/true/false/yes/no.
A value that does not convert stops the script before it starts, with one line naming the variable.
"""

# --- Redis, shared by every machine ---
redis_ip = "127.0.0.1"  # address of the Redis server
redis_port = 6379  # port of the Redis server
redis_db = 0  # Redis database number
redis_pass = ""  # Redis password, never printed or logged; set LAION_REDIS_PASS instead of writing it here
redis_tls = False  # connect to Redis over TLS
redis_tls_ca = ""  # CA bundle that signs the Redis server's certificate (empty: the system's)
redis_sentinels = []  # Sentinels (host:port, comma-separated) that find the master and follow its failovers; empty:
#                       connect to redis_ip:redis_port directly. Password and TLS apply to them too (docs/deploy.md)
redis_master_name = "laion5b"  # name under which the sentinels monitor the master (their "sentinel monitor" line)
redis_min_replicas = 0  # replicas that must hold a count, a shard's commit and a producer batch before anything
#                         depends on it (WAIT; 0: do not wait): a failover then loses none of them (docs/guarantees.md)


class RedisKey:
    """Names of the Redis keys that the original suite used; dashboards read them. Set here only; a test pins them."""

    task_key = "laion5b_task"  # list: the task queue
    tongji_all = "laion5b_tongji_all"  # counter: tasks added (queued or rejected as bad rows)
    error_key = "laion5b_task_error"  # list: error records waiting for save_error_task.py
    tongji_error = "laion5b_tongji_error"  # counter: tasks that ended as an error record
    tongji_succ = "laion5b_tongji_succ"  # counter: tasks that ended as a stored image
    tongji_disk = "tongji_worker_disk"  # hash: host_id -> used GB of the download disk


# --- add_task.py: the producer ---
parquet_dir = "./parquet"  # folder holding the URL lists: parquet, CSV, TSV, JSON lines, ... (searched recursively);
#                            also s3://bucket/prefix, read through the s3_* settings below (docs/input.md)
addtask_threshold = 5_000_000  # keep the queue at or under this many tasks
addtask_batch = 10_000  # rows pushed to Redis in one transaction
done_path = "./done_part.txt"  # URL list files fully queued, one path a line

# --- add_task.py: which files and columns (see "Other URL lists" in docs/input.md) ---
input_format = "auto"  # "auto" (by extension: .parquet .csv .tsv .jsonl, text ones also .gz), or one of parquet,
#                        csv, tsv, jsonl, txt (one URL per line: read only when set here, from .txt and .txt.gz)
url_col = ""  # column of the image URL (empty: "url", any case)
caption_col = ""  # column of the caption (empty: "text" or "caption", any case; none: no caption)
id_col = ""  # column of the sample id, used as file name (empty: "hash" or "sample_id", any case; none: row number)
hash_col = ""  # column of each image's content hash (never guessed: LAION's "hash" column is an id)
verify_hash = ""  # "sha256" or "md5": a body whose hash differs from hash_col's is hash_mismatch (needs hash_col;
#                   empty: off)
input_columns = []  # names of the columns of files without a header row (CSV, TSV), e.g. caption,url for CC3M's TSV
save_columns = []  # further columns carried with each task (its "meta") into the sample's metadata, e.g.
#                    original_width
status_dir = "./status"  # report.py writes <status_dir>/<subset>/<part>.parquet here

# --- downloader.py: the workers ---
store_dir = "./images"  # images are stored under store_dir/<subset>/<part>/<shard>/<id>.<ext>; also
#                        s3://bucket/prefix (object storage: webdataset output recommended, see docs/output.md)
engine = "threads"  # how a worker downloads: "threads" (a requests thread pool) or "async" (one asyncio event loop)
thread_num = 32  # download threads per downloader process (engine "threads")
engine_loop = "asyncio"  # event loop of engine "async": "asyncio" (the standard library's) or "uvloop" (about 1.2 x
#                          the images per CPU second, but its TLS read buffers cost memory: 314 MB against 221 MB a
#                          worker at 1,024 in flight with webdataset output; asyncio's is used, with a log line, where
#                          uvloop is not installed)
concurrency = 512  # downloads in flight per downloader process (engine "async")
max_inflight_bytes = 1024 * 1024 * 1024  # body bytes one process may hold in memory; a download waits for budget
max_per_host = 16  # downloads in progress to one URL host name by all workers together (0: no limit, no Redis cost)
host_start_concurrency = 4  # a host's fleet-wide limit at first; grows by 1 per window of good answers up to
#                             max_per_host, halves on a 429/503 or a burst of timeouts
max_per_ip = 0  # downloads in progress to one server IP address by all workers together (0: off, no cost); for many
#                host names on one small server, not for CDNs (one address serves thousands of unrelated sites)
host_id = ""  # name of this machine in Redis (empty: the hostname); must differ between machines
heartbeat_ttl = 30  # seconds after which a silent worker counts as dead and its tasks return to the queue
max_attempts = 3  # tries of a task that fails transiently (timeout, connection, dns, 5xx, 408, 429)
retry_backoff = 30.0  # seconds before the first retry of a transient failure, doubled at each further attempt
max_retry_after = 3600.0  # longest Retry-After (of a 429 or 503) that is honoured, in seconds
connect_timeout = 5.0  # seconds to open a connection
read_timeout = 10.0  # seconds of silence allowed while reading a response
download_timeout = 30.0  # seconds for a whole download, body included
max_image_bytes = 32 * 1024 * 1024  # larger bodies are cut off and recorded as too_large
max_redirects = 5  # redirects followed per image
user_agent_contact = ""  # URL or e-mail address where site owners reach you, sent in the User-Agent; please set it
#                          (why: "Politeness and opt-outs" in docs/downloader.md)
user_agent = ""  # HTTP User-Agent sent as is (empty: laion5b-downloader/<version>, plus " (+<user_agent_contact>)"
#                  when that is set)
disallowed_header_directives = ["noai", "noimageai", "noindex", "noimageindex"]  # X-Robots-Tag opt-outs
honour_tdm_reservation = True  # an image served with the W3C TDMRep header tdm-reservation: 1 is not stored
#                                 (disallowed)
robots = True  # obey robots.txt (RFC 9309) for every token of robots_agents, fetched once per site for the fleet
robots_agents = ["laion5b-downloader", "img2dataset"]  # robots.txt tokens that must all be allowed a URL (each
#                                                        obeys its own group, else the * group)
robots_ttl = 86400  # seconds a site's robots.txt is kept in Redis before it is fetched again
max_crawl_delay = 30.0  # longest robots.txt Crawl-delay honoured, in seconds; a site asking more is
#                         crawl_delay_too_long
dns_cache_ttl = 300.0  # seconds a DNS answer is reused in a process (failed look-ups: 5 s; 0: no cache)
dns_timeout = 10.0  # seconds a DNS look-up may take before it counts as failed (dns); the next try looks up again
tls_ca_file = ""  # CA bundle that image servers' certificates are checked against (empty: the bundle requests ships)
allowed_networks = []  # CIDRs exempt from the private-address refusal, e.g. 127.0.0.0/8 for a local test server
fsync_images = False  # fsync each image before it is renamed into place (slower; survives power loss)
save_caption = False  # write each image's caption beside it as <id>.txt
save_metadata = False  # write each image's metadata beside it as <id>.json (url, sizes, sha256, ...)
output_format = "files"  # "files" (one file per image, as the original) or "webdataset" (tar shards with caption
#                          and metadata, see docs/output.md)
shard_size = 10_000  # webdataset: samples per shard; a shard is also closed when the worker stops or is paused
shard_max_seconds = 600.0  # webdataset: a shard open this long is closed even when not full
webdataset_keep_format = False  # webdataset: keep each image's own format (.jpg, .png, .webp, ... side by side:
#                                 the webdataset library reads them, Hugging Face datasets does not); False: images
#                                 not in encode_format are re-encoded to it, so every sample has the same members
staging_dir = "./staging"  # s3:// store_dir: local folder where shards are written and sealed before their upload
#                            (point monitor_disk at its disk: a full staging area pauses claiming)
s3_endpoint_url = ""  # s3:// store_dir: URL of the S3 API (empty: AWS; e.g. https://storage.googleapis.com for GCS,
#                       your MinIO, Ceph RGW or R2 endpoint); credentials come from the AWS_* environment variables,
#                       ~/.aws files or an instance role, never from this file
s3_region = ""  # s3:// store_dir: region of the bucket (empty: AWS_REGION or ~/.aws/config)
s3_addressing = "path"  # s3:// store_dir: "path" (endpoint/bucket/key) or "virtual" (bucket.endpoint/key)
s3_part_mb = 64  # s3:// store_dir: a shard larger than this many MB is uploaded in parts of this size (5-5120)
log_dir = "./logs"  # rotating log file per process (empty: stderr only)

# --- image processing (between download and storage; the names and defaults of img2dataset; see docs/output.md) ---
resize_mode = "no"  # "no" (the bytes as downloaded), "keep_ratio", "keep_ratio_largest", "center_crop" or "border"
image_size = 256  # pixels: the smaller side (keep_ratio, center_crop) or larger side (keep_ratio_largest, border)
resize_only_if_bigger = False  # leave images whose side is not over image_size at their size
encode_format = "jpg"  # format of processed images: "jpg", "png" or "webp"
encode_quality = 95  # jpg and webp: quality 0-100; png: zlib compression level 0-9 (set it: 95 is refused)
skip_reencode = False  # keep the downloaded bytes of an image that needs no change and is already in encode_format
min_image_size = 0  # refuse images whose smaller side is under this many pixels (too_small; 0: off)
max_aspect_ratio = 0.0  # refuse images whose larger side / smaller side is over this (bad_aspect; 0: off)
max_image_area = 0  # refuse images of more pixels (too_many_pixels); 0: 89478485 when decoding, off with "no"

# --- disk guard and monitor_disk.py ---
monitor_disk = "."  # path whose disk usage is watched and published
monitor_interval = 60  # seconds between two disk samples published by monitor_disk.py
stop_threshold = 5000  # GB used on monitor_disk above which workers stop taking tasks
min_free_gb = 50  # GB free on monitor_disk under which workers stop taking tasks
store_stall_seconds = 60.0  # a store write, fsync or listing taking longer stops the worker claiming (store_stalled)
#                              until it returns

# --- save_error_task.py and speed.py ---
store_error_dir = "./error_task/"  # error records are saved here as YYYYMMDD_<hour // 4>.txt
min_success_ratio = 0.5  # speed.py flags an interval whose success ratio falls under this
history_days = 14  # days of history kept in Redis (a sample a minute for 48 h, one an hour after that)
dashboard_token = ""  # token the dashboard (speed.py --serve) asks for; needed to listen beyond loopback; set
# LAION_DASHBOARD_TOKEN instead of writing it here

# --- run.sh: the quick start on one machine ---
demo_port = 8765  # port of the local sample image server that run.sh --demo starts on 127.0.0.1
