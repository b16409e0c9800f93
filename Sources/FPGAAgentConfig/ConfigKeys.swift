import FPGACore
package import FPGALinux
import FPGASimulator
import Logging
import Foundation

/// Where a resolved value came from.
public enum ConfigSource: String, Sendable, Hashable {
  case `default`, file, environment, flag
}

/// The closed sets of the configuration, usable as flags.
public enum PlatformKind: String, CaseIterable, Sendable, Hashable {
  case simulated, linux
}

/// How the agent reaches VMs: QEMU's monitor sockets itself, or libvirt's API.
public enum HypervisorKind: String, CaseIterable, Sendable, Hashable {
  case qmp, libvirt
}

public enum Durability: String, CaseIterable, Sendable, Hashable {
  /// A commit survives the agent's crash.
  case process
  /// Each commit is flushed to the disk before it is answered.
  case power
}

/// One configuration key, declared once: its path in the YAML file, its type, documentation,
/// environment variable and flag, how it is read from YAML and from text (environment, flags,
/// `--set`), its own range or choices, and how it is shown. The file reader, the environment,
/// the flags, `--check-config` and the key table in docs/operations.md all follow from
/// `ConfigKeys.all`. (The value itself lives, typed and with its default, in `AgentConfig`.)
public struct ConfigKey {
  public let path: String
  public let type: String
  public let doc: String
  public let environment: String?
  /// Long flags setting it (documentation; `ConfigOptions` declares them for the parser).
  public let flags: [String]
  /// The default as documented, when it depends on the host (else `show(AgentConfig())`).
  public let documentedDefault: String?
  package let read: (Any, String, ConfigReader, inout AgentConfig) -> Void
  /// Applies text (environment, flag, `--set`); returns a problem, or nil. Nil: file only.
  package let parse: ((String, inout AgentConfig) -> String?)?
  /// A problem with the value (its range, its choices), or nil.
  package let check: (AgentConfig) -> String?
  public let show: (AgentConfig) -> String

  public var defaultText: String { documentedDefault ?? show(AgentConfig()) }

  package init(
    path: String, type: String, doc: String, environment: String?, flags: [String], documentedDefault: String?,
    read: @escaping (Any, String, ConfigReader, inout AgentConfig) -> Void,
    parse: ((String, inout AgentConfig) -> String?)?, check: @escaping (AgentConfig) -> String?,
    show: @escaping (AgentConfig) -> String
  ) {
    self.path = path
    self.type = type
    self.doc = doc
    self.environment = environment
    self.flags = flags
    self.documentedDefault = documentedDefault
    self.read = read
    self.parse = parse
    self.check = check
    self.show = show
  }
}

extension ConfigKey {
  package static func string(
    _ path: String, _ field: WritableKeyPath<AgentConfig, String>, env: String? = nil, flags: [String] = [],
    default documented: String? = nil, absolutePath: Bool = false, _ doc: String
  ) -> ConfigKey {
    ConfigKey(
      path: path, type: absolutePath ? "path" : "string", doc: doc, environment: env, flags: flags,
      documentedDefault: documented,
      read: { value, path, reader, config in reader.string(value, path).map { config[keyPath: field] = $0 } },
      parse: { text, config in
        config[keyPath: field] = text
        return nil
      },
      check: { config in
        let value = config[keyPath: field]
        return absolutePath && !value.isEmpty && !value.hasPrefix("/")
          ? "\(path) \(quoted(value)) must be an absolute path" : nil
      },
      show: { $0[keyPath: field] })
  }

  package static func int(
    _ path: String, _ field: WritableKeyPath<AgentConfig, Int>, _ range: ClosedRange<Int>, env: String? = nil,
    flags: [String] = [], _ doc: String
  ) -> ConfigKey {
    ConfigKey(
      path: path, type: "integer \(range.lowerBound)–\(range.upperBound)", doc: doc, environment: env, flags: flags,
      documentedDefault: nil,
      read: { value, path, reader, config in reader.int(value, path).map { config[keyPath: field] = $0 } },
      parse: { text, config in
        guard let number = Int(text) else { return "\(quoted(text)) is not a whole number" }
        config[keyPath: field] = number
        return nil
      },
      check: { config in
        let value = config[keyPath: field]
        return range.contains(value)
          ? nil : "\(path) \(value) is out of range: \(range.lowerBound)-\(range.upperBound)"
      },
      show: { String($0[keyPath: field]) })
  }

  package static func bool(
    _ path: String, _ field: WritableKeyPath<AgentConfig, Bool>, env: String? = nil, flags: [String] = [],
    _ doc: String
  ) -> ConfigKey {
    ConfigKey(
      path: path, type: "true or false", doc: doc, environment: env, flags: flags, documentedDefault: nil,
      read: { value, path, reader, config in reader.bool(value, path).map { config[keyPath: field] = $0 } },
      parse: { text, config in
        guard let flag = ["true": true, "1": true, "false": false, "0": false][text] else {
          return "\(quoted(text)) is not true or false"
        }
        config[keyPath: field] = flag
        return nil
      },
      check: { _ in nil },
      show: { String($0[keyPath: field]) })
  }

  package static func choice<Value: RawRepresentable & CaseIterable>(
    _ path: String, _ field: WritableKeyPath<AgentConfig, Value>, env: String? = nil, flags: [String] = [],
    _ doc: String
  ) -> ConfigKey where Value.RawValue == String {
    let names = Value.allCases.map(\.rawValue)
    let set: (String, inout AgentConfig) -> String? = { text, config in
      guard let value = Value(rawValue: text) else {
        return "\(quoted(text)) is not one of: \(names.joined(separator: ", "))"
      }
      config[keyPath: field] = value
      return nil
    }
    return ConfigKey(
      path: path, type: "one of " + names.joined(separator: ", "), doc: doc, environment: env, flags: flags,
      documentedDefault: nil,
      read: { value, path, reader, config in
        guard let text = reader.string(value, path) else { return }
        if let problem = set(text, &config) { reader.problems.append("\(path) \(problem)") }
      },
      parse: set, check: { _ in nil }, show: { $0[keyPath: field].rawValue })
  }

  /// A value read by its own reader (lists, mappings), file only unless `parse` is given.
  package static func custom<Value>(
    _ path: String, _ field: WritableKeyPath<AgentConfig, Value>, type: String, flags: [String] = [],
    env: String? = nil, default documented: String? = nil, _ doc: String,
    read: @escaping (ConfigReader, Any, String) -> Value?,
    parse: ((String, inout AgentConfig) -> String?)? = nil,
    show: @escaping (Value) -> String
  ) -> ConfigKey {
    ConfigKey(
      path: path, type: type, doc: doc, environment: env, flags: flags, documentedDefault: documented,
      read: { value, path, reader, config in read(reader, value, path).map { config[keyPath: field] = $0 } },
      parse: parse, check: { _ in nil }, show: { show($0[keyPath: field]) })
  }
}

/// Every key of the agent's configuration.
public enum ConfigKeys {
  public static var all: [ConfigKey] {
    [
      // The node API.
      .string(
        "server.listen", \.server.listen, env: "FPGA_AGENT_LISTEN", flags: ["--listen"],
        "TCP `HOST:PORT` (`[::1]:50051` for IPv6); empty disables TCP"),
      .string(
        "server.unix_socket", \.server.unixSocket, env: "FPGA_AGENT_UNIX_SOCKET", flags: ["--unix-socket"],
        default:
          "root: `/run/fpga-agent/agent.sock`; others: `$XDG_RUNTIME_DIR/fpga-agent.sock`, else `/tmp/fpga-agent-UID.sock`",
        absolutePath: true, "Unix socket; empty disables it"),
      .int(
        "server.max_connections", \.server.maxConnections, 1...1_000_000, env: "FPGA_AGENT_MAX_CONNECTIONS",
        "connections served at once per listener; more are closed at accept (logged). Lowered at start to stay below the open-file limit, which the agent raises to its hard limit (the unit sets `LimitNOFILE=65536`)"
      ),
      .int(
        "server.idle_timeout_seconds", \.server.idleTimeoutSeconds, 1...86_400, env: "FPGA_AGENT_IDLE_TIMEOUT_SECONDS",
        "a connection without an RPC for this long (also one that never sends the HTTP/2 preface) is closed"),
      .int(
        "server.max_concurrent_streams", \.server.maxConcurrentStreams, 1...65_535,
        "streams per connection, advertised in `SETTINGS_MAX_CONCURRENT_STREAMS`: a client queues the streams beyond it, the connection survives"
      ),
      .int("server.max_request_bytes", \.server.maxRequestBytes, 1024...(64 << 20), "largest request message"),
      .int(
        "server.default_deadline_seconds", \.server.defaultDeadlineSeconds, 0...86_400,
        "deadline of a call whose client sends no `grpc-timeout` (watch streams are exempt); past it the call ends `DEADLINE_EXCEEDED` and its handler is cancelled (a detach left `detaching`, a switch wait dropped); 0: none"
      ),
      .bool(
        "server.insecure", \.server.insecure, env: "FPGA_AGENT_INSECURE",
        "allow plaintext TCP on an address other than loopback (logged loudly); otherwise the agent refuses to start"),
      .string(
        "server.socket_group", \.server.socketGroup, default: "the agent's group",
        "group of the Unix socket, which is made 0660 once bound (the agent runs with umask 0077)"),
      .string(
        "server.tls.cert", \.server.tls.cert, env: "FPGA_AGENT_TLS_CERT", flags: ["--tls-cert"], absolutePath: true,
        "mTLS on the TCP listener: the agent's certificate chain (PEM)"),
      .string(
        "server.tls.key", \.server.tls.key, env: "FPGA_AGENT_TLS_KEY", flags: ["--tls-key"], absolutePath: true,
        "its private key (PEM)"),
      .string(
        "server.tls.client_ca", \.server.tls.clientCA, env: "FPGA_AGENT_TLS_CLIENT_CA", flags: ["--tls-client-ca"],
        absolutePath: true,
        "the CA bundle client certificates must chain to (a client without one fails the handshake)"),
      .int(
        "server.tls.reload_seconds", \.server.tls.reloadSeconds, 1...86_400,
        "how often the certificate and key files are re-read (rotation without a restart)"),
      // Authorization.
      .custom(
        "auth.roles", \.auth.roles, type: "mapping", default: "none",
        "identity → `viewer`, `operator` or `admin`; identities: `spiffe://…` (URI SAN), `cn:NAME` (subject CN), `token:NAME` (HTTP token), `uid:N`, `gid:N` (Unix-socket peer)",
        read: { reader, value, path in reader.roles(value, path) },
        show: { roles in
          roles.isEmpty
            ? "{}" : roles.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value.rawValue)" }.joined(separator: ", ")
        }),
      .custom(
        "auth.plaintext_role", \.auth.plaintextRole, type: "viewer, operator, admin or none",
        "role of a plaintext TCP caller (loopback, or `server.insecure`); `none` refuses them",
        read: { reader, value, path in
          guard let text = reader.string(value, path) else { return nil }
          if text == "none" { return .some(nil) }
          guard let role = Role(rawValue: text) else {
            reader.problems.append("\(path) \(quoted(text)) is not a role: viewer, operator, admin or none")
            return nil
          }
          return .some(role)
        },
        parse: { text, config in
          if text == "none" {
            config.auth.plaintextRole = nil
            return nil
          }
          guard let role = Role(rawValue: text) else { return "\(quoted(text)) is not viewer, operator, admin or none" }
          config.auth.plaintextRole = role
          return nil
        },
        show: { $0?.rawValue ?? "none" }),
      .bool(
        "auth.root_is_admin", \.auth.rootIsAdmin,
        "root on the Unix socket is admin (the agent's own user always is)"),
      .string(
        "auth.token_file", \.auth.tokenFile, absolutePath: true,
        "`TOKEN,NAME` lines: HTTP callers presenting TOKEN (Bearer or Basic) are `token:NAME`"),
      // The daemon.
      .choice(
        "platform", \.platform, env: "FPGA_AGENT_PLATFORM", flags: ["--platform"], "the platform the agent manages"),
      .string(
        "state_dir", \.stateDir, env: "FPGA_AGENT_STATE_DIR", flags: ["--state-dir"],
        default: "root: `/var/lib/fpga-agent`; others: `~/.local/state/fpga-agent`", absolutePath: true,
        "durable state (created 0700): `node-id` and `state.sqlite`"),
      .choice(
        "state_durability", \.stateDurability, env: "FPGA_AGENT_STATE_DURABILITY",
        "`process`: a commit survives the agent's crash; `power`: each commit is fsynced (survives power loss)"),
      .string(
        "fault_injection", \.faultInjection, env: "FPGA_AGENT_FAULT_INJECTION",
        "tests only: `crash-before:STEP`, `crash-after:STEP`, `fail:STEP` of a reconfiguration (see design.md)"),
      .string(
        "node_id", \.nodeID, env: "FPGA_AGENT_NODE_ID", flags: ["--node-id"],
        default: "kept in `state_dir/node-id`, created as `HOST-xxxxxx`", "the node's id"),
      .int(
        "rescan_interval_seconds", \.rescanIntervalSeconds, 0...86_400, env: "FPGA_AGENT_RESCAN_INTERVAL_SECONDS",
        "periodic platform rescan; 0 disables"),
      .int(
        "shutdown_timeout_seconds", \.shutdownTimeoutSeconds, 1...600, env: "FPGA_AGENT_SHUTDOWN_TIMEOUT_SECONDS",
        "SIGTERM: streams end and calls finish within this; what is left (a stalled reader, a guest that never acknowledges) is cancelled, with 5 s more for the cancellation. An unfinished reconfiguration resumes from its journal at the next start"
      ),
      .choice(
        "log.level", \.log.level, env: "FPGA_AGENT_LOG_LEVEL", flags: ["--log-level"], "the least severe level logged"),
      .choice(
        "log.format", \.log.format, env: "FPGA_AGENT_LOG_FORMAT", flags: ["--log-format"],
        "`text`, or `json` (one object per line)"),
      // Health.
      .int(
        "health.correctable_errors_per_minute", \.health.correctableErrorsPerMinute, 1...1_000_000,
        "correctable AER errors per minute above which a device is degraded"),
      .bool(
        "health.drain_on_fatal", \.health.drainOnFatal, "drain a PF when it reports an uncorrectable fatal error"),
      // Layouts.
      .bool(
        "layout.restore_on_boot", \.layout.restoreOnBoot, env: "FPGA_AGENT_LAYOUT_RESTORE_ON_BOOT",
        "after a host reboot (the kernel's boot id changed), re-create each managed PF's recorded VF layout (VF count, qdma/qmax, allocated VFs bound to vfio-pci) before reconciling, so allocations keep their VFs; off: the PFs stay as found and allocations on missing VFs end"
      ),
      .string(
        "layout.boot_id_file", \.layout.bootIDFile, env: "FPGA_AGENT_BOOT_ID_FILE", absolutePath: true,
        "where the linux platform reads the kernel's boot id"),
      // The Linux platform.
      .string(
        "linux.sysfs_root", \.linux.sysfsRoot, env: "FPGA_AGENT_SYSFS_ROOT", flags: ["--sysfs-root"],
        absolutePath: true, "where sysfs is; every access stays inside it (symlinks resolved and checked)"),
      .string(
        "linux.dev_root", \.linux.devRoot, env: "FPGA_AGENT_DEV_ROOT", flags: ["--dev-root"], absolutePath: true,
        "where `/dev/vfio/N` are looked for"),
      .int(
        "linux.watchdog_seconds", \.linux.watchdogSeconds, 1...3600,
        "how long a VF count write may block before it is reported (the write goes on in its worker)"),
      .custom(
        "linux.selectors", \.linux.selectors, type: "list", flags: ["--selector"], default: "QDMA PFs",
        "list of `{vendors, devices, drivers, pci_addresses}`; a function is managed when any selector matches all its non-empty fields. As text (flag, `--set`): `vendor=10ee,device=903f,driver=qdma-pf,address=0000:3b:00.0`, selectors separated by `;`",
        read: { reader, value, path in reader.selectors(value, path) },
        parse: { text, config in
          do {
            config.linux.selectors = try text.split(separator: ";").map { try PFSelector.parse(String($0)) }
            return nil
          } catch let error as ConfigError {
            return error.problems.joined(separator: "; ")
          } catch {
            return "\(error)"
          }
        },
        show: { selectors in selectors.map(\.text).joined(separator: "; ") }),
      .custom(
        "linux.accelerators", \.linux.accelerators, type: "list", default: "none",
        "accelerator slots in PCI BARs: list of `{pf, bar, slot}` (register map: accelerator-registers.md); the path is confined to `linux.sysfs_root`",
        read: { reader, value, path in reader.barAccelerators(value, path) },
        show: { list in list.map { "\($0.pf) bar \($0.bar) slot \($0.slot)" }.joined(separator: "; ") }),
      .bool("linux.uevents", \.linux.uevents, "rescan on the kernel's PCI uevents (add, remove, bind, unbind, change)"),
      // The hypervisor.
      .choice(
        "hypervisor", \.hypervisor, env: "FPGA_AGENT_HYPERVISOR", flags: ["--hypervisor"],
        "how VMs are reached: `qmp` (QEMU's monitor sockets, `qemu.*`; none configured: the simulated VMs) or `libvirt` (every running or paused domain of `libvirt.uri`; needs `libvirt.so.0` at start, see \"VMs managed by libvirt\")"
      ),
      .string(
        "libvirt.uri", \.libvirt.uri, env: "FPGA_AGENT_LIBVIRT_URI", flags: ["--libvirt-uri"],
        "the libvirt connection URI when `hypervisor: libvirt`"),
      .bool(
        "libvirt.persistent_attach", \.libvirt.persistentAttach,
        "with `hypervisor: libvirt`, attach a VF to a persistent domain's definition too (`VIR_DOMAIN_AFFECT_CONFIG`), and detach it from there, so it is still there when libvirt restarts the domain; off: the running domain only (a transient domain is always live only)"
      ),
      .bool(
        "libvirt.qemu_monitor_pause", \.libvirt.qemuMonitorPause, env: "FPGA_AGENT_LIBVIRT_QEMU_MONITOR_PAUSE",
        "with `hypervisor: libvirt`, pause and resume VFIO devices (`qemu.pause_commands`, a QEMU built with qemu/vfio-pause) through libvirt's QEMU monitor passthrough (`virDomainQemuMonitorCommand`, `libvirt-qemu.so.0`): each running domain is asked `query-commands` once per start, and libvirt marks it tainted (`custom-monitor`); off: re-layouts under libvirt domains detach and re-attach"
      ),
      .custom(
        "libvirt.domains", \.libvirt.domains, type: "list", env: "FPGA_AGENT_LIBVIRT_DOMAINS", default: "every domain",
        "with `hypervisor: libvirt`, serve only the domains whose name matches one of these shell patterns (`fnmatch`: `vm-*`, `tenant-[ab]-?`); the others are not listed and cannot be attached to. As text (environment, `--set`): patterns separated by `,` (empty: every domain)",
        read: { reader, value, path in
          let items = (value as? [Any]) ?? [value]
          return items.enumerated().compactMap { reader.string($1, "\(path)[\($0)]") }
        },
        parse: { text, config in
          // Empty text: every domain.
          config.libvirt.domains = text.split(separator: ",").map { String($0).trimmingCharacters(in: .whitespaces) }
            .filter { !$0.isEmpty }
          return nil
        },
        show: { $0.joined(separator: ", ") }),
      .string(
        "libvirt.metadata_namespace", \.libvirt.metadataNamespace, env: "FPGA_AGENT_LIBVIRT_METADATA_NAMESPACE",
        default: "none",
        "with `hypervisor: libvirt`, serve only the domains whose `<metadata>` holds an element of this namespace URI (set with `virsh metadata DOMAIN URI --key fpga --set '<agent/>' --live --config`)"
      ),
      // QEMU.
      .custom(
        "qemu.sockets", \.qemu.sockets, type: "mapping", flags: ["--qmp-socket NAME=PATH"], default: "none",
        "VMs: name → QMP socket",
        read: { reader, value, path in
          var sockets: [String: String] = [:]
          reader.mapping(value, path) { name, value, path in reader.string(value, path).map { sockets[name] = $0 } }
          return sockets
        },
        parse: { text, config in
          guard let equals = text.firstIndex(of: "="), equals != text.startIndex else {
            return "\(quoted(text)) is not NAME=PATH"
          }
          config.qemu.sockets[String(text[..<equals])] = String(text[text.index(after: equals)...])
          return nil
        },
        show: { sockets in sockets.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ", ") }),
      .string(
        "qemu.socket_dir", \.qemu.socketDir, env: "FPGA_AGENT_QMP_DIR", flags: ["--qmp-dir"], absolutePath: true,
        "a directory whose Unix sockets are VMs (`NAME.sock`, `NAME.qmp` or `NAME`)"),
      .string(
        "qemu.device_model", \.qemu.deviceModel, flags: ["--vf-device-model"],
        "the QEMU device model VFs are plugged in as (`edu` stands in for a VF in tests)"),
      .custom(
        "qemu.pause_commands", \.qemu.pauseCommands, type: "list",
        "QMP commands of a QEMU that can pause a VFIO device; found with `query-commands`",
        read: { reader, value, path in
          let items = (value as? [Any]) ?? [value]
          return items.enumerated().compactMap { reader.string($1, "\(path)[\($0)]") }
        },
        show: { $0.joined(separator: ", ") }),
      .int(
        "qemu.detach_timeout_seconds", \.qemu.detachTimeoutSeconds, 1...600,
        "how long DetachVF waits for the guest's acknowledgement unless the request says"),
      // The simulated node.
      .custom(
        "simulator.cards", \.simulator.cards, type: "list", default: "two cards",
        "list of `{bus, domain, numa_node, total_vfs, enabled_vfs, bind_to_vfio, mailbox}`",
        read: { reader, value, path in reader.cards(value, path) },
        show: { cards in
          cards.map { "bus \(hex(Int($0.bus), width: 2)): \($0.enabledVFs)/\($0.totalVFs)" }.joined(separator: "; ")
        }),
      .custom(
        "simulator.vms", \.simulator.vms, type: "list", default: "`vm-1` (4 ports, VFIO pause), `vm-2` (2 ports)",
        "simulated VMs, used when no QEMU is configured: list of `{name, root_ports, vfio_pause, acknowledges_unplug}`",
        read: { reader, value, path in reader.vms(value, path) },
        show: { vms in vms.map { "\($0.name) (\($0.rootPorts) ports)" }.joined(separator: ", ") }),
      .string(
        "simulator.state_file", \.simulator.stateFile, env: "FPGA_AGENT_SIMULATOR_STATE_FILE", absolutePath: true,
        "keep the simulated cards' state in this file across restarts"),
      .int(
        "simulator.accelerators_per_card", \.simulator.acceleratorsPerCard, 0...16,
        "accelerator slots per simulated card (`card-DDDD:BB/accN`)"),
      .int(
        "simulator.accelerator_switch_us", \.simulator.acceleratorSwitchMicroseconds, 1...1_000_000,
        "a simulated save or load: fixed time"),
      .int(
        "simulator.accelerator_bandwidth_mb_s", \.simulator.acceleratorBandwidthMBps, 1...1_000_000,
        "a simulated save or load: state over this bandwidth"),
      .custom(
        "simulator.workloads", \.simulator.workloads, type: "list",
        default:
          "`tenant-a` (weight 1) and `tenant-b` (weight 2) on `card-0000:3b/acc0`, 3 ms every 10 ms, 1 MiB state",
        "list of `{guest, accelerator, function, weight, interval_ms, job_ms, state_bytes}`: guests the agent registers and feeds with jobs",
        read: { reader, value, path in reader.workloads(value, path) },
        show: { list in list.map { "\($0.guest) on \($0.accelerator)" }.joined(separator: ", ") }),
      // Sharing.
      .int(
        "sharing.slice_ms", \.sharing.sliceMilliseconds, 1...10_000,
        "each accelerator's time slice until SetSharingPolicy changes it"),
      .int(
        "sharing.overcommit_limit", \.sharing.overcommitLimit, 1...64,
        "each accelerator's most guests until SetSharingPolicy changes it"),
      .int(
        "sharing.metrics_interval_seconds", \.sharing.metricsIntervalSeconds, 1...3600,
        "how often accelerator figures are refreshed in the inventory"),
      // The HTTP listener.
      .string(
        "http.listen", \.http.listen, env: "FPGA_AGENT_HTTP_LISTEN", flags: ["--http-listen"],
        "the dashboard, `/metrics` and `/healthz` (`HOST:PORT`); empty: off"),
      .bool(
        "http.insecure", \.http.insecure,
        "serve it on an address other than loopback without TLS (tokens travel in clear)"),
      // The orchestrator link.
      .string(
        "orchestrator.address", \.orchestrator.address, env: "FPGA_AGENT_ORCHESTRATOR", flags: ["--orchestrator"],
        default: "empty (no link)", "the orchestrator the agent dials and takes commands from (`HOST:PORT`)"),
      .int("orchestrator.heartbeat_seconds", \.orchestrator.heartbeatSeconds, 1...300, "heartbeat period on the link"),
      .string(
        "orchestrator.tls.cert", \.orchestrator.tls.cert, env: "FPGA_AGENT_ORCHESTRATOR_TLS_CERT",
        flags: ["--orchestrator-tls-cert"], absolutePath: true, "mTLS on the link: the agent's certificate chain (PEM)"),
      .string(
        "orchestrator.tls.key", \.orchestrator.tls.key, env: "FPGA_AGENT_ORCHESTRATOR_TLS_KEY",
        flags: ["--orchestrator-tls-key"], absolutePath: true, "its private key (PEM)"),
      .string(
        "orchestrator.tls.ca", \.orchestrator.tls.ca, env: "FPGA_AGENT_ORCHESTRATOR_TLS_CA",
        flags: ["--orchestrator-tls-ca"], absolutePath: true,
        "the CA bundle the orchestrator's certificate must chain to"),
      .string(
        "orchestrator.server_name", \.orchestrator.serverName, default: "the address's host",
        "the name the orchestrator's certificate must carry"),
      .choice(
        "orchestrator.role", \.orchestrator.role,
        "what the orchestrator's commands may do (`admin` for reconfigure, drain, policies)"),
      .bool(
        "orchestrator.insecure", \.orchestrator.insecure,
        "allow a plaintext link to an address other than loopback"),
      // Kubernetes.
      .bool(
        "kubernetes.device_plugin", \.kubernetes.devicePlugin,
        "serve the kubelet device plugin v1beta1 and register with the kubelet (also set by `--kubelet-dir` and `FPGA_AGENT_KUBELET_DIR`)"
      ),
      .custom(
        "kubernetes.kubelet_dir", \.kubernetes.kubeletDir, type: "path", flags: ["--kubelet-dir"],
        env: "FPGA_AGENT_KUBELET_DIR",
        "where `kubelet.sock` is and the plugin's sockets go; given as a flag or in the environment it also enables the device plugin",
        read: { reader, value, path in reader.string(value, path) },
        parse: { text, config in
          config.kubernetes.kubeletDir = text
          config.kubernetes.devicePlugin = true
          return nil
        },
        show: { $0 }),
      .custom(
        "kubernetes.pools", \.kubernetes.pools, type: "list", default: "one pool `xilinx.com/qdma-vf` of every VF",
        "list of `{resource, pfs}`: an extended resource per pool, from the VFs of `pfs` (empty: all)",
        read: { reader, value, path in reader.pools(value, path) },
        show: { pools in pools.map { $0.resource + ($0.pfs.isEmpty ? "" : " \($0.pfs)") }.joined(separator: ", ") }),
      .bool(
        "kubernetes.dra.enabled", \.kubernetes.dra.enabled, flags: ["--dra"],
        "serve the kubelet's DRA plugin and publish ResourceSlices (\"Kubernetes DRA\")"),
      .string(
        "kubernetes.dra.driver_name", \.kubernetes.dra.driverName, flags: ["--dra-driver-name"],
        "the DRA driver's name (a DNS subdomain of at most 63 characters)"),
      .string(
        "kubernetes.dra.registry_dir", \.kubernetes.dra.registryDir, flags: ["--dra-registry-dir"], absolutePath: true,
        "where the registration socket `<driver>-reg.sock` goes"),
      .string(
        "kubernetes.dra.plugins_dir", \.kubernetes.dra.pluginsDir, flags: ["--dra-plugins-dir"], absolutePath: true,
        "the service socket `<dir>/<driver>/dra.sock` and the KubeVirt metadata files"),
      .string(
        "kubernetes.dra.cdi_dir", \.kubernetes.dra.cdiDir, flags: ["--cdi-dir"], absolutePath: true,
        "where the CDI specs go"),
      .string(
        "kubernetes.dra.node_name", \.kubernetes.dra.nodeName, default: "the node id",
        "the node's name in Kubernetes (the pool and the slices' `spec.nodeName`)"),
      .bool(
        "kubernetes.dra.publish_slices", \.kubernetes.dra.publishSlices,
        "publish the node's ResourceSlices (needs the API)"),
      .bool(
        "kubernetes.dra.grow_on_demand", \.kubernetes.dra.growOnDemand,
        "also publish the VFs each PF could have (up to `grow_max_vfs`, attribute `<driver>/created: false`) and grow the PF when a claim allocated to one is prepared (\"Grow on demand\")"
      ),
      .custom(
        "kubernetes.dra.grow_pfs", \.kubernetes.dra.growPFs, type: "list of PCI addresses", default: "every managed PF",
        "the PFs that may grow",
        read: { reader, value, path in reader.addresses(value, path) },
        show: { $0.isEmpty ? "every managed PF" : $0.joined(separator: ", ") }),
      .int(
        "kubernetes.dra.grow_max_vfs", \.kubernetes.dra.growMaxVFs, 0...4096,
        "the most VFs a PF is grown to (at most its `sriov_totalvfs`); 0: `sriov_totalvfs`"),
      .int(
        "kubernetes.dra.grow_step", \.kubernetes.dra.growStep, 1...64,
        "a growth creates at least this many more VFs (so fewer Prepares re-lay the PF)"),
      .bool(
        "kubernetes.dra.grow_allow_replug", \.kubernetes.dra.growAllowReplug,
        "a VM whose QEMU cannot pause VFIO devices may see its VF unplugged and plugged again by a growth; off: such a PF is not offered"
      ),
      .int(
        "kubernetes.dra.reconfiguration_fence_seconds", \.kubernetes.dra.reconfigurationFenceSeconds, 0...300,
        "how long a reconfiguration waits for its VFs' `NoSchedule` taints to reach the API server before its first step; 0: it does not wait"
      ),
      .custom(
        "kubernetes.api.kubeconfig", \.kubernetes.api.kubeconfig, type: "path", flags: ["--kubeconfig"],
        env: "KUBECONFIG", default: "none (in-cluster)",
        "a kubeconfig: the server, CA, token or client certificate of its current context (\"The Kubernetes API\"); of `KUBECONFIG`'s colon-separated list only the first file is read. The other `kubernetes.api` keys override its fields",
        read: { reader, value, path in reader.string(value, path) },
        parse: { text, config in
          config.kubernetes.api.kubeconfig = text.split(separator: ":").first.map(String.init) ?? ""
          return nil
        },
        show: { $0 }),
      .string(
        "kubernetes.api.context", \.kubernetes.api.context, flags: ["--kube-context"],
        default: "the kubeconfig's `current-context`", "the kubeconfig's context to use"),
      .string(
        "kubernetes.api.server", \.kubernetes.api.server, flags: ["--kube-api-server"],
        default: "the kubeconfig's, else in-cluster (`KUBERNETES_SERVICE_HOST`, `KUBERNETES_SERVICE_PORT`)",
        "the API server, `https://HOST:PORT`"),
      .string(
        "kubernetes.api.token_file", \.kubernetes.api.tokenFile, flags: ["--kube-token-file"],
        default: "the kubeconfig user's, else `/var/run/secrets/kubernetes.io/serviceaccount/token`",
        absolutePath: true,
        "the bearer token (read again for each request: bound tokens rotate)"),
      .string(
        "kubernetes.api.ca_file", \.kubernetes.api.caFile, flags: ["--kube-ca-file"],
        default: "the kubeconfig cluster's, else `/var/run/secrets/kubernetes.io/serviceaccount/ca.crt`",
        absolutePath: true, "the CA the server's certificate must chain to"),
    ]
  }

  package static func key(_ path: String) -> ConfigKey? { all.first { $0.path == path } }

  /// The key table of docs/operations.md.
  public static var markdownTable: String {
    var lines = ["| key | type | flag | environment | default | meaning |", "| --- | --- | --- | --- | --- | --- |"]
    for key in all {
      let flags = key.flags.map { "`\($0)`" }.joined(separator: ", ")
      let env = key.environment.map { "`\($0)`" } ?? ""
      let shown = key.defaultText
      let defaultText =
        key.documentedDefault != nil
        ? shown : shown.isEmpty ? "empty" : "`\(shown.replacingOccurrences(of: "|", with: "\\|"))`"
      lines.append("| `\(key.path)` | \(key.type) | \(flags) | \(env) | \(defaultText) | \(key.doc) |")
    }
    return lines.joined(separator: "\n")
  }
}

/// A configuration with where each value came from.
public struct ResolvedConfig: Sendable {
  public var config: AgentConfig
  public var sources: [String: ConfigSource]

  /// `key: value  # source`, every key, in declaration order.
  public var listing: String {
    ConfigKeys.all.map { key in
      let value = key.show(config)
      return "\(key.path): \(value.isEmpty ? "\"\"" : value)  # \(sources[key.path] ?? .default)"
    }.joined(separator: "\n")
  }

  package init(config: AgentConfig, sources: [String: ConfigSource]) {
    self.config = config
    self.sources = sources
  }
}

extension PFSelector {
  /// As `--selector` takes it.
  package var text: String {
    (vendors.map { "vendor=\(hex(Int($0), width: 4))" } + devices.map { "device=\(hex(Int($0), width: 4))" }
      + drivers.map { "driver=\($0)" } + pciAddresses.map { "address=\($0)" }).joined(separator: ",")
  }
}
