"""A fake Kubernetes API server for the DRA tests: HTTPS on loopback with a CA of its own and a
bearer token, so the agent's real in-cluster client path runs (TLS verification against ca.crt,
`Authorization: Bearer <token>`); with `client_user` set, a client certificate from the same CA
whose CN is that user authenticates a request without a token (the API server's x509 path).

It serves what a DRA driver touches, with the API server's observable behaviour where it matters:
- ResourceClaims the test creates: GET `/apis/resource.k8s.io/v1/namespaces/NS/resourceclaims/NAME`,
  PUT `.../status`, and server-side apply of `status.devices` (PATCH `.../status` with
  `application/apply-patch+yaml` and a `fieldManager`: a list map keyed by driver, device, pool and
  shareID, each manager owning the entries it sent; the uid is a precondition; entries must name
  allocated devices of the writer's driver, as the 1.36 per-driver authorization requires);
- ResourceSlices: list (with `fieldSelector` on spec.nodeName and spec.driver, `labelSelector`
  equality), `?watch=1` (chunked JSON event stream, with synthetic ADDED events when no
  resourceVersion is given), GET, POST (also with generateName), PUT (optimistic concurrency on
  metadata.resourceVersion), DELETE and DELETE of a collection;
- `GET /api/v1/nodes/NAME`.
List items carry no apiVersion/kind (as the real server answers), stored objects get uid,
resourceVersion, generation, creationTimestamp and managedFields, and taints without timeAdded get
one: a client must tolerate all of these.

Every ResourceSlice written is checked three ways before it is stored: kubernetes-validate --strict
for 1.34 (its Python API, the same schemas as the command), the `kubernetes` client's pydantic
model (`V1ResourceSlice.model_validate`, which refuses unknown keys), and `slice_limit_problems`
below (the API server's validation rules that neither schema expresses). A refused write is
answered 422 (Invalid) and recorded in `problems`, which the tests require to stay empty.
"""
import copy
import datetime
import ipaddress
import json
import re
import socket
import ssl
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

RESOURCE_API = "/apis/resource.k8s.io/v1"
KUBE_VERSION = "1.34.0"

# --- The API server's validation rules (k8s.io/kubernetes pkg/apis/resource/validation, 1.34) ----
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
C_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$")
QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[KMGTPE]i?|[munk])?$")

MAX_DEVICES = 128
MAX_DEVICES_WITH_TAINTS_OR_COUNTERS = 64
MAX_ATTRIBUTES_AND_CAPACITIES = 32
MAX_ATTRIBUTE_VALUES = 48
MAX_DOMAIN = 63
MAX_IDENTIFIER = 32
MAX_STRING_VALUE = 64
MAX_TAINTS = 4  # 1.34's schema: "The maximum number of taints is 4" (16 from 1.36)
TAINT_EFFECTS = {"NoSchedule", "NoExecute"}  # "None" is 1.36+
ATTRIBUTE_VALUE_FIELDS = ("int", "bool", "string", "version")
LIST_VALUE_FIELDS = ("ints", "bools", "strings", "versions")


def _dns_subdomain(value, limit=253):
    return isinstance(value, str) and 0 < len(value) <= limit and bool(DNS_SUBDOMAIN.match(value))


def _qualified_name_problems(name, where):
    """An attribute or capacity name: C identifier (<= 32), optionally DOMAIN/ with a DNS subdomain <= 63."""
    problems = []
    domain, _, identifier = name.rpartition("/")
    if "/" in name and not _dns_subdomain(domain, MAX_DOMAIN):
        problems.append(f"{where}: domain {domain!r} is not a DNS subdomain of at most {MAX_DOMAIN} characters")
    if not (C_IDENTIFIER.match(identifier) and len(identifier) <= MAX_IDENTIFIER):
        problems.append(f"{where}: {identifier!r} is not a C identifier of at most {MAX_IDENTIFIER} characters")
    return problems


def _label_key_problems(key, where):
    prefix, _, name = key.rpartition("/")
    problems = []
    if "/" in key and not _dns_subdomain(prefix):
        problems.append(f"{where}: key prefix {prefix!r} is not a DNS subdomain")
    if not (LABEL_NAME.match(name) and len(name) <= 63):
        problems.append(f"{where}: key name {name!r} is not a label name")
    return problems


def slice_limit_problems(obj, driver=None, node=None):
    """What the API server would refuse in a ResourceSlice (or what breaks this driver's contract
    when driver and node are given), as a list of messages; empty when it is fine."""
    problems = []
    if obj.get("apiVersion") != "resource.k8s.io/v1" or obj.get("kind") != "ResourceSlice":
        problems.append(f"apiVersion/kind {obj.get('apiVersion')}/{obj.get('kind')}, want resource.k8s.io/v1 ResourceSlice")
    meta = obj.get("metadata") or {}
    name = meta.get("name") or ""
    if name and not _dns_subdomain(name):
        problems.append(f"metadata.name {name!r} is not a DNS subdomain")
    if not name and not meta.get("generateName"):
        problems.append("metadata: neither name nor generateName")
    spec = obj.get("spec") or {}
    if not _dns_subdomain(spec.get("driver"), 63):
        problems.append(f"spec.driver {spec.get('driver')!r} is not a DNS subdomain of at most 63 characters")
    if driver is not None and spec.get("driver") != driver:
        problems.append(f"spec.driver {spec.get('driver')!r}, want {driver!r}")
    selection = [k for k in ("nodeName", "nodeSelector", "allNodes", "perDeviceNodeSelection") if spec.get(k)]
    if len(selection) != 1:
        problems.append(f"exactly one of nodeName, nodeSelector, allNodes, perDeviceNodeSelection must be set: {selection}")
    if node is not None and spec.get("nodeName") != node:
        problems.append(f"spec.nodeName {spec.get('nodeName')!r}, want {node!r}")
    pool = spec.get("pool") or {}
    pool_name = pool.get("name") or ""
    if not pool_name or len(pool_name) > 253 or not all(_dns_subdomain(part) for part in pool_name.split("/")):
        problems.append(f"spec.pool.name {pool_name!r} is not a path of DNS subdomains of at most 253 characters")
    if not isinstance(pool.get("generation"), int) or pool["generation"] < 0:
        problems.append(f"spec.pool.generation {pool.get('generation')!r} is not an integer >= 0")
    if not isinstance(pool.get("resourceSliceCount"), int) or pool["resourceSliceCount"] < 1:
        problems.append(f"spec.pool.resourceSliceCount {pool.get('resourceSliceCount')!r} is not an integer >= 1")
    devices = spec.get("devices") or []
    if devices and spec.get("sharedCounters"):
        problems.append("devices and sharedCounters in one slice")
    special = any(d.get("taints") or d.get("consumesCounters")
                  or any(any(f in (a or {}) for f in LIST_VALUE_FIELDS) for a in (d.get("attributes") or {}).values())
                  for d in devices)
    limit = MAX_DEVICES_WITH_TAINTS_OR_COUNTERS if special else MAX_DEVICES
    if len(devices) > limit:
        problems.append(f"{len(devices)} devices in one slice, at most {limit}"
                        + (" once a device has taints, counters or list attributes" if special else ""))
    seen = set()
    for index, device in enumerate(devices):
        where = f"spec.devices[{index}]"
        dname = device.get("name") or ""
        if not (DNS_LABEL.match(dname) and len(dname) <= 63):
            problems.append(f"{where}.name {dname!r} is not a DNS label")
        if dname in seen:
            problems.append(f"{where}.name {dname!r} twice in the slice")
        seen.add(dname)
        attributes = device.get("attributes") or {}
        capacity = device.get("capacity") or {}
        if len(attributes) + len(capacity) > MAX_ATTRIBUTES_AND_CAPACITIES:
            problems.append(f"{where}: {len(attributes) + len(capacity)} attributes and capacities, at most "
                            f"{MAX_ATTRIBUTES_AND_CAPACITIES}")
        values = 0
        for key, value in attributes.items():
            problems += _qualified_name_problems(key, f"{where}.attributes[{key}]")
            value = value or {}
            set_fields = [f for f in ATTRIBUTE_VALUE_FIELDS + LIST_VALUE_FIELDS if value.get(f) is not None]
            if len(set_fields) != 1:
                problems.append(f"{where}.attributes[{key}]: exactly one value, got {set_fields}")
            for field in set_fields:
                items = value[field] if field in LIST_VALUE_FIELDS else [value[field]]
                values += len(items)
                for item in items:
                    if field.startswith("string") and len(item) > MAX_STRING_VALUE:
                        problems.append(f"{where}.attributes[{key}]: string of {len(item)} characters, at most "
                                        f"{MAX_STRING_VALUE}")
                    if field.startswith("version") and not (SEMVER.match(item) and len(item) <= MAX_STRING_VALUE):
                        problems.append(f"{where}.attributes[{key}]: {item!r} is not a semantic version")
                    if field.startswith("int") and (not isinstance(item, int) or isinstance(item, bool)):
                        problems.append(f"{where}.attributes[{key}]: {item!r} is not an integer")
                    if field.startswith("bool") and not isinstance(item, bool):
                        problems.append(f"{where}.attributes[{key}]: {item!r} is not a boolean")
        if values > MAX_ATTRIBUTE_VALUES:
            problems.append(f"{where}: {values} attribute values, at most {MAX_ATTRIBUTE_VALUES}")
        for key, value in capacity.items():
            problems += _qualified_name_problems(key, f"{where}.capacity[{key}]")
            quantity = str((value or {}).get("value", ""))
            if not QUANTITY.match(quantity):
                problems.append(f"{where}.capacity[{key}].value {quantity!r} is not a quantity")
        taints = device.get("taints") or []
        if len(taints) > MAX_TAINTS:
            problems.append(f"{where}: {len(taints)} taints, at most {MAX_TAINTS}")
        for t_index, taint in enumerate(taints):
            twhere = f"{where}.taints[{t_index}]"
            problems += _label_key_problems(taint.get("key") or "", twhere)
            value = taint.get("value") or ""
            if not (LABEL_VALUE.match(value) and len(value) <= 63):
                problems.append(f"{twhere}.value {value!r} is not a label value (at most 63 characters of "
                                "[A-Za-z0-9-_.], alphanumeric at both ends)")
            if taint.get("effect") not in TAINT_EFFECTS:
                problems.append(f"{twhere}.effect {taint.get('effect')!r} is not one of {sorted(TAINT_EFFECTS)}")
    return problems


def validate_slice(obj, driver=None, node=None):
    """The three checks of a ResourceSlice as written by a client: a list of problems."""
    import kubernetes_validate
    from kubernetes.client import V1ResourceSlice

    problems = []
    try:
        kubernetes_validate.validate(copy.deepcopy(obj), KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        problems.append(f"kubernetes-validate --strict -k {KUBE_VERSION}: {e.message} at {list(e.absolute_path)}")
    except Exception as e:  # noqa: BLE001 - SchemaNotFoundError and friends are failures too
        problems.append(f"kubernetes-validate: {type(e).__name__}: {e}")
    try:
        V1ResourceSlice.model_validate(copy.deepcopy(obj))
    except Exception as e:  # noqa: BLE001 - pydantic's ValidationError
        problems.append(f"kubernetes V1ResourceSlice.model_validate: {e}")
    return problems + slice_limit_problems(obj, driver, node)


def validate_claim(obj):
    """A ResourceClaim the test serves must be a real one."""
    import kubernetes_validate
    from kubernetes.client import ResourceV1ResourceClaim  # (V1ResourceClaim is core/v1's PodSpec reference)

    kubernetes_validate.validate(copy.deepcopy(obj), KUBE_VERSION, strict=True)
    ResourceV1ResourceClaim.model_validate(copy.deepcopy(obj))


# --- TLS ----------------------------------------------------------------------------------------

def make_tls(directory):
    """A CA and a server certificate for 127.0.0.1, localhost and 10.0.2.2 (the host as QEMU's user
    network shows it to a guest): (ca.crt, server.crt, server.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory = Path(directory)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-kubernetes-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.DNSName("kubernetes.default.svc"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("10.0.2.2"))]),
                critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = directory / "ca.crt", directory / "server.crt", directory / "server.key"
    (directory / "ca.key").write_bytes(ca_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def make_client_cert(directory, common_name):
    """A client certificate for `common_name` from make_tls's CA in `directory` (as the API server's
    x509 authenticator sees it, the user is the CN): (client.crt, client.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory = Path(directory)
    ca = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = directory / "client.crt", directory / "client.key"
    paths[0].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


# --- The server ---------------------------------------------------------------------------------

def _status(code, reason, message):
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


def _now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _field_selector(text):
    """spec.nodeName=X,spec.driver=Y (= or ==; != too) -> [(path, op, value)]."""
    terms = []
    for term in filter(None, (text or "").split(",")):
        match = re.match(r"^([^=!]+)(==|=|!=)(.*)$", term)
        if not match:
            raise ValueError(f"unparsable field selector term {term!r}")
        terms.append((match.group(1), "!=" if match.group(2) == "!=" else "=", match.group(3)))
    return terms


def _field(obj, path):
    for part in path.split("."):
        obj = (obj or {}).get(part)
    return "" if obj is None else str(obj)


class FakeKubeAPI:
    """Start with `FakeKubeAPI(directory, node="interop").start()`; `url`, `ca_file`, `token_file`."""

    def __init__(self, directory, node, driver=None, token=None):
        self.directory = Path(directory)
        self.node = node
        self.driver = driver
        self.token = token or uuid.uuid4().hex
        self.token_file = self.directory / "token"
        self.token_file.write_text(self.token + "\n")
        self.ca_file, self.cert_file, self.key_file = make_tls(self.directory)
        self.node_uid = str(uuid.uuid4())
        self.lock = threading.Condition()
        self.rv = 100
        self.claims = {}  # (namespace, name) -> object
        self.device_status_owners = {}  # (namespace, name) -> {entry key: field manager}
        self.applied = []  # accepted status applies: ((namespace, name), field manager, [entries sent])
        self.refuse_status_writes = False  # answer status applies 403, as without the RBAC for them
        self.slices = {}  # name -> object
        self.events = []  # (rv, type, object) of ResourceSlices
        self.problems = []  # refused writes: (method, path, [problem])
        self.unauthorized = []  # (method, path, Authorization header)
        self.client_user = None  # the CN a client certificate must carry to authenticate (None: tokens only)
        self.by_certificate = []  # (method, path) of requests authenticated by a client certificate
        self.log = []  # (time, method, path, status)
        self.generations = []  # (rv, name, pool generation, resourceSliceCount) of every stored write
        self.stopping = threading.Event()
        self.server = None

    # -- lifecycle

    def start(self):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        context.set_alpn_protocols(["http/1.1"])
        # Client certificates are asked for and, when sent, verified against the CA (as the API
        # server's --client-ca-file); a client without one authenticates with its token.
        context.verify_mode = ssl.CERT_OPTIONAL
        context.load_verify_locations(self.ca_file)
        api = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

            def get_request(self):
                conn, address = self.socket.accept()
                # The handshake runs in the handler's thread, not in the accept loop.
                return context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False), address

        class Handler(_Handler):
            pass

        Handler.api = api
        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        return self

    def stop(self):
        self.stopping.set()
        with self.lock:
            self.lock.notify_all()
        if self.server:
            self.server.shutdown()
            self.server.server_close()

    @property
    def url(self):
        return f"https://127.0.0.1:{self.port}"

    # -- what the test does

    def _next_rv(self):
        self.rv += 1
        return str(self.rv)

    def put_claim(self, claim):
        validate_claim(claim)
        with self.lock:
            stored = copy.deepcopy(claim)
            stored["metadata"]["resourceVersion"] = self._next_rv()
            stored["metadata"].setdefault("creationTimestamp", _now())
            self.claims[(claim["metadata"]["namespace"], claim["metadata"]["name"])] = stored
            self.device_status_owners.pop((claim["metadata"]["namespace"], claim["metadata"]["name"]), None)

    def delete_claim(self, namespace, name):
        with self.lock:
            self.claims.pop((namespace, name), None)

    def wipe_slices(self):
        """What the kubelet does at its start and 30 s after the driver's last connection ended."""
        with self.lock:
            for name in list(self.slices):
                obj = self.slices.pop(name)
                obj["metadata"]["resourceVersion"] = self._next_rv()
                self.events.append((self.rv, "DELETED", obj))
            self.lock.notify_all()

    def tamper_slice(self, name, mutate):
        """Another writer changes a stored slice: mutate(obj) edits a copy, stored as an update."""
        with self.lock:
            current = self.slices[name]
            obj = copy.deepcopy(current)
            mutate(obj)
            self._stamp(obj, current)
            self.slices[name] = obj

    def slice_list(self):
        with self.lock:
            return [copy.deepcopy(s) for s in self.slices.values()]

    def writes(self):
        return [entry for entry in self.log if entry[1] in ("POST", "PUT", "PATCH", "DELETE")]

    def settled_pool(self, driver, pool):
        """(generation, [slices]) when the pool's slices all have one generation and their number is
        the resourceSliceCount they state; None otherwise."""
        with self.lock:
            slices = [copy.deepcopy(s) for s in self.slices.values()
                      if s["spec"]["driver"] == driver and s["spec"]["pool"]["name"] == pool]
        if not slices:
            return None
        generations = {s["spec"]["pool"]["generation"] for s in slices}
        counts = {s["spec"]["pool"]["resourceSliceCount"] for s in slices}
        if len(generations) != 1 or len(counts) != 1 or len(slices) != counts.pop():
            return None
        return generations.pop(), sorted(slices, key=lambda s: s["metadata"]["name"])

    def wait_settled(self, driver, pool, timeout=30, predicate=lambda generation, slices: True, what="the pool"):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.settled_pool(driver, pool)
            if last and predicate(*last):
                return last
            time.sleep(0.2)
        summary = [(s["metadata"]["name"], s["spec"]["pool"], len(s["spec"].get("devices") or []))
                   for s in self.slice_list()]
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; slices now: {summary}; "
                             f"problems: {self.problems[-3:]}; last requests: {self.log[-10:]}")

    # -- request handling (called by the handler under no lock)

    def _store_slice(self, obj, method, path):
        problems = validate_slice(obj, self.driver, self.node)
        if problems:
            self.problems.append((method, path, problems))
            return 422, _status(422, "Invalid", f"ResourceSlice is invalid: {'; '.join(problems)}")
        return None

    def _apply_device_status(self, key, claim, query, body, content_type):
        """Server-side apply of a claim's status.devices by one field manager."""
        name = key[1]
        if self.refuse_status_writes:
            return 403, _status(403, "Forbidden", f'resourceclaims.resource.k8s.io "{name}" is forbidden: User '
                                                  '"system:serviceaccount:fpga-system:fpga-agent" cannot patch resource '
                                                  '"resourceclaims/status" in API group "resource.k8s.io"')
        if content_type != "application/apply-patch+yaml":
            return 415, _status(415, "UnsupportedMediaType", f"the body of the request was in an unknown format: {content_type}")
        manager = query.get("fieldManager", [""])[0]
        if not manager:
            return 400, _status(400, "BadRequest", "PATCH with apply requires a fieldManager")
        if (body.get("apiVersion"), body.get("kind")) != ("resource.k8s.io/v1", "ResourceClaim"):
            return 400, _status(400, "BadRequest", f"apply of {body.get('apiVersion')}/{body.get('kind')}")
        if body.get("metadata", {}).get("uid") not in (None, claim["metadata"]["uid"]):
            return 409, _status(409, "Conflict", f'Operation cannot be fulfilled on resourceclaims "{name}": '
                                                 "Precondition failed: UID in precondition does not match")
        problems = []
        if set(body) - {"apiVersion", "kind", "metadata", "status"} or set(body.get("status") or {}) - {"devices"}:
            problems.append(f"a driver applies status.devices only, not {sorted(set(body) | set(body.get('status') or {}))}")
        # What a manager leaves out it no longer owns: `status: {}` withdraws its entries.
        sent = (body.get("status") or {}).get("devices") or []
        if not isinstance(sent, list):
            problems.append(f"status.devices is not a list: {sent!r}")
            sent = []

        def entry_key(d):
            return (d.get("driver"), d.get("device"), d.get("pool"), d.get("shareID"))

        allocated = {(r["driver"], r["device"], r["pool"], r.get("shareID"))
                     for r in (((claim.get("status") or {}).get("allocation") or {}).get("devices") or {}).get("results") or []}
        for index, entry in enumerate(sent):
            if entry.get("driver") != self.driver:
                # 1.36+: resourceclaims/driver is authorized per driver name.
                return 403, _status(403, "Forbidden", f"status.devices[{index}]: driver {entry.get('driver')!r} is not "
                                                      f"{self.driver!r}, the only driver this writer may report for")
            if entry_key(entry) not in allocated:
                problems.append(f"status.devices[{index}]: {entry_key(entry)} is not an allocated device of the claim")
        if len({entry_key(e) for e in sent}) != len(sent):
            problems.append("status.devices: an entry twice")
        if problems:
            self.problems.append(("PATCH", f"resourceclaims/{name}/status", problems))
            return 422, _status(422, "Invalid", "; ".join(problems))
        with self.lock:
            current = copy.deepcopy(self.claims.get(key))
            if current is None:
                return 404, _status(404, "NotFound", f'resourceclaims.resource.k8s.io "{name}" not found')
            owners = self.device_status_owners.setdefault(key, {})
            sent_keys = {entry_key(e) for e in sent}
            status = current.setdefault("status", {})
            kept = [e for e in status.get("devices") or []
                    if entry_key(e) not in sent_keys and owners.get(entry_key(e)) != manager]
            for k in [k for k, m in owners.items() if m == manager]:
                del owners[k]
            for k in sent_keys:
                owners[k] = manager
            status["devices"] = kept + copy.deepcopy(sent)
            if not status["devices"]:
                del status["devices"]
            try:
                validate_claim(current)
            except Exception as e:  # noqa: BLE001 - jsonschema's and pydantic's errors alike
                self.problems.append(("PATCH", f"resourceclaims/{name}/status", [str(e)[:500]]))
                return 422, _status(422, "Invalid", f"ResourceClaim is invalid: {str(e)[:300]}")
            current["metadata"]["resourceVersion"] = self._next_rv()
            self.claims[key] = current
            self.applied.append((key, manager, copy.deepcopy(sent)))
        return 200, current

    def device_status(self, namespace, name):
        """The claim's status.devices as stored now."""
        with self.lock:
            claim = self.claims.get((namespace, name)) or {}
            return copy.deepcopy((claim.get("status") or {}).get("devices") or [])

    def handle(self, method, path, query, body, content_type=None):
        """-> (code, object) or (code, generator of events) for a watch."""
        parts = [p for p in path.split("/") if p]
        # Node
        if method == "GET" and parts[:3] == ["api", "v1", "nodes"] and len(parts) == 4:
            if parts[3] != self.node:
                return 404, _status(404, "NotFound", f'nodes "{parts[3]}" not found')
            return 200, {"apiVersion": "v1", "kind": "Node",
                         "metadata": {"name": self.node, "uid": self.node_uid, "resourceVersion": "7",
                                      "labels": {"kubernetes.io/hostname": self.node}},
                         "spec": {}, "status": {}}
        if parts[:4] != ["apis", "resource.k8s.io", "v1", "namespaces"] and parts[:3] != ["apis", "resource.k8s.io", "v1"]:
            return 404, _status(404, "NotFound", "the server could not find the requested resource")
        rest = parts[3:]
        # ResourceClaims
        if len(rest) >= 4 and rest[0] == "namespaces" and rest[2] == "resourceclaims":
            namespace, name = rest[1], rest[3]
            with self.lock:
                claim = copy.deepcopy(self.claims.get((namespace, name)))
            if claim is None:
                return 404, _status(404, "NotFound", f'resourceclaims.resource.k8s.io "{name}" not found')
            if method == "GET" and len(rest) == 4:
                return 200, claim
            if method == "PATCH" and rest[4:] == ["status"]:
                return self._apply_device_status((namespace, name), claim, query, body, content_type)
            if method == "PUT" and rest[4:] == ["status"]:
                if body.get("metadata", {}).get("uid") not in (None, claim["metadata"]["uid"]):
                    return 409, _status(409, "Conflict", "uid precondition failed")
                with self.lock:
                    claim["status"] = body.get("status", {})
                    claim["metadata"]["resourceVersion"] = self._next_rv()
                    self.claims[(namespace, name)] = claim
                return 200, claim
            return 405, _status(405, "MethodNotAllowed", f"{method} is not supported here")
        # ResourceSlices
        if rest[:1] != ["resourceslices"]:
            return 404, _status(404, "NotFound", "the server could not find the requested resource")
        if len(rest) == 1:
            try:
                terms = _field_selector(query.get("fieldSelector", [""])[0])
            except ValueError as e:
                return 400, _status(400, "BadRequest", str(e))
            labels = dict(t.split("=", 1) for t in filter(None, query.get("labelSelector", [""])[0].replace("==", "=").split(",")))

            def matches(obj):
                ok = all((_field(obj, p) == v) == (op == "=") for p, op, v in terms)
                return ok and all((obj["metadata"].get("labels") or {}).get(k) == v for k, v in labels.items())

            if method == "GET" and query.get("watch", ["0"])[0] in ("1", "true"):
                return 200, self._watch(matches, query)
            if method == "GET":
                with self.lock:
                    items = [copy.deepcopy(s) for s in self.slices.values() if matches(s)]
                    rv = str(self.rv)
                for item in items:  # list items come without TypeMeta from the real server
                    item.pop("apiVersion", None)
                    item.pop("kind", None)
                return 200, {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSliceList",
                             "metadata": {"resourceVersion": rv}, "items": items}
            if method == "POST":
                refused = self._store_slice(body, method, path)
                if refused:
                    return refused
                with self.lock:
                    obj = copy.deepcopy(body)
                    meta = obj.setdefault("metadata", {})
                    if not meta.get("name"):
                        meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                    if meta["name"] in self.slices:
                        return 409, _status(409, "AlreadyExists",
                                            f'resourceslices.resource.k8s.io "{meta["name"]}" already exists')
                    if meta.get("resourceVersion"):
                        return 400, _status(400, "BadRequest", "resourceVersion should not be set on objects to be created")
                    self._stamp(obj, None)
                    self.slices[meta["name"]] = obj
                    return 201, copy.deepcopy(obj)
            if method == "DELETE":
                with self.lock:
                    doomed = [n for n, s in self.slices.items() if matches(s)]
                    for n in doomed:
                        obj = self.slices.pop(n)
                        obj["metadata"]["resourceVersion"] = self._next_rv()
                        self.events.append((self.rv, "DELETED", obj))
                    self.lock.notify_all()
                return 200, {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSliceList",
                             "metadata": {"resourceVersion": str(self.rv)}, "items": []}
            return 405, _status(405, "MethodNotAllowed", f"{method} is not supported here")
        name = rest[1]
        with self.lock:
            current = copy.deepcopy(self.slices.get(name))
        if method == "GET" and len(rest) == 2:
            if current is None:
                return 404, _status(404, "NotFound", f'resourceslices.resource.k8s.io "{name}" not found')
            return 200, current
        if method == "PUT" and len(rest) == 2:
            if current is None:
                return 404, _status(404, "NotFound", f'resourceslices.resource.k8s.io "{name}" not found')
            if body.get("metadata", {}).get("name") != name:
                return 400, _status(400, "BadRequest", "the name of the object does not match the name on the URL")
            refused = self._store_slice(body, method, path)
            if refused:
                return refused
            with self.lock:
                current = self.slices.get(name)
                if current is None:
                    return 404, _status(404, "NotFound", f'resourceslices.resource.k8s.io "{name}" not found')
                sent_rv = body["metadata"].get("resourceVersion")
                if sent_rv and sent_rv != current["metadata"]["resourceVersion"]:
                    return 409, _status(409, "Conflict", f'Operation cannot be fulfilled on resourceslices.resource.k8s.io '
                                        f'"{name}": the object has been modified; please apply your changes to the '
                                        'latest version and try again')
                if body["spec"].get("driver") != current["spec"]["driver"]:
                    return 422, _status(422, "Invalid", "spec.driver: field is immutable")
                obj = copy.deepcopy(body)
                self._stamp(obj, current)
                self.slices[name] = obj
                return 200, copy.deepcopy(obj)
        if method == "DELETE" and len(rest) == 2:
            with self.lock:
                obj = self.slices.pop(name, None)
                if obj is None:
                    return 404, _status(404, "NotFound", f'resourceslices.resource.k8s.io "{name}" not found')
                obj["metadata"]["resourceVersion"] = self._next_rv()
                self.events.append((self.rv, "DELETED", obj))
                self.lock.notify_all()
            return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                         "details": {"name": name, "group": "resource.k8s.io", "kind": "resourceslices",
                                     "uid": obj["metadata"]["uid"]}}
        return 405, _status(405, "MethodNotAllowed", f"{method} is not supported here")

    def _stamp(self, obj, current):
        """What the API server adds (called with the lock held)."""
        meta = obj["metadata"]
        if current is None:
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = _now()
            meta["generation"] = 1
        else:
            meta["uid"] = current["metadata"]["uid"]
            meta["creationTimestamp"] = current["metadata"]["creationTimestamp"]
            changed = obj["spec"] != current["spec"]
            meta["generation"] = current["metadata"]["generation"] + (1 if changed else 0)
        meta["managedFields"] = [{"manager": "fpga-agent", "operation": "Update", "apiVersion": "resource.k8s.io/v1",
                                  "time": _now(), "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]
        for device in obj["spec"].get("devices") or []:
            for taint in device.get("taints") or []:
                taint.setdefault("timeAdded", _now())
        meta["resourceVersion"] = self._next_rv()
        pool = obj["spec"]["pool"]
        self.generations.append((self.rv, meta["name"], pool["generation"], pool["resourceSliceCount"]))
        self.events.append((self.rv, "ADDED" if current is None else "MODIFIED", copy.deepcopy(obj)))
        self.lock.notify_all()

    def _watch(self, matches, query):
        """Events after resourceVersion (all current objects as ADDED first when none is given)."""
        timeout = min(int(query.get("timeoutSeconds", ["60"])[0] or 60), 60)
        since = query.get("resourceVersion", [""])[0]
        deadline = time.monotonic() + timeout

        def events():
            with self.lock:
                if since in ("", "0"):
                    initial = [copy.deepcopy(s) for s in self.slices.values() if matches(s)]
                    position = len(self.events)
                else:
                    initial = []
                    position = next((i for i, e in enumerate(self.events) if e[0] > int(since)), len(self.events))
            for obj in initial:
                yield {"type": "ADDED", "object": obj}
            while not self.stopping.is_set() and time.monotonic() < deadline:
                with self.lock:
                    if position >= len(self.events):
                        self.lock.wait(timeout=0.5)
                    pending = self.events[position:]
                    position = len(self.events)
                for _, kind, obj in pending:
                    if matches(obj):
                        yield {"type": kind, "object": copy.deepcopy(obj)}

        return events()


def _common_name(peer):
    """The subject CN of a verified peer certificate (ssl's getpeercert() form), or None."""
    for rdn in (peer or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    api = None  # set on the subclass

    def log_message(self, *args):
        pass

    def setup(self):
        super().setup()
        try:
            self.connection.settimeout(30)
            self.connection.do_handshake()
        except (ssl.SSLError, OSError):
            self.close_connection = True
            self.rfile = self.wfile = None

    def handle(self):
        if self.rfile is None:
            return
        try:
            super().handle()
        except (ssl.SSLError, ConnectionError, socket.timeout, OSError):
            pass

    def _body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                data += self.rfile.read(size)
                self.rfile.readline()
            return data
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _serve(self, method):
        api = self.api
        url = urlsplit(self.path)
        raw = self._body()
        if (api.client_user is not None and self.headers.get("Authorization") is None
                and _common_name(self.connection.getpeercert()) == api.client_user):
            api.by_certificate.append((method, url.path))
        elif self.headers.get("Authorization") != f"Bearer {api.token}":
            api.unauthorized.append((method, url.path, self.headers.get("Authorization")))
            api.log.append((time.time(), method, url.path, 401))
            return self._send(401, _status(401, "Unauthorized", "Unauthorized"))
        try:
            body = json.loads(raw) if raw else {}
        except ValueError as e:
            api.log.append((time.time(), method, url.path, 400))
            return self._send(400, _status(400, "BadRequest", f"body is not JSON: {e}"))
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip() or None
        if content_type == "application/apply-patch+yaml" and b"\\/" in raw:
            # The API server reads an apply patch as YAML 1.1 (go-yaml v2), which has no `\/` escape.
            api.problems.append((method, url.path, ["apply body has JSON's \\/ escape, which YAML 1.1 refuses"]))
            api.log.append((time.time(), method, url.path, 400))
            return self._send(400, _status(400, "BadRequest", "error decoding YAML: found unknown escape character"))
        code, result = api.handle(method, url.path, parse_qs(url.query), body, content_type)
        api.log.append((time.time(), method, url.path + ("?" + url.query if url.query else ""), code))
        if isinstance(result, dict):
            return self._send(code, result)
        # A watch: chunked, one JSON event per line, until it times out or the server stops.
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for event in result:
                chunk = json.dumps(event).encode() + b"\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except (ConnectionError, ssl.SSLError, OSError):
            pass
        self.close_connection = True

    def do_GET(self):
        self._serve("GET")

    def do_POST(self):
        self._serve("POST")

    def do_PUT(self):
        self._serve("PUT")

    def do_DELETE(self):
        self._serve("DELETE")

    def do_PATCH(self):
        self._serve("PATCH")
