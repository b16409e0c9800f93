// swift-tools-version:6.1
import PackageDescription

let grpcCore = Target.Dependency.product(name: "GRPCCore", package: "grpc-swift-2")
let grpcProtobuf = Target.Dependency.product(name: "GRPCProtobuf", package: "grpc-swift-protobuf")
let grpcHTTP2 = Target.Dependency.product(
  name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport")
let swiftProtobuf = Target.Dependency.product(name: "SwiftProtobuf", package: "swift-protobuf")
let logging = Target.Dependency.product(name: "Logging", package: "swift-log")
let argumentParser = Target.Dependency.product(
  name: "ArgumentParser", package: "swift-argument-parser")
let serviceLifecycle = Target.Dependency.product(
  name: "ServiceLifecycle", package: "swift-service-lifecycle")

// The runtime's modules share one dependency list (the daemon's libraries).
let runtimeDependencies: [Target.Dependency] = [
  "FPGACore", "FPGASimulator", "FPGALinux", "FPGAQEMU", "FPGALibvirt", "FPGAAgentAPI", "FPGAStore",
  "FPGADevicePlugin", "FPGADRA", grpcCore,
  grpcHTTP2, logging, serviceLifecycle, argumentParser, .product(name: "Yams", package: "Yams"),
  .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOHTTP2", package: "swift-nio-http2"),
  .product(name: "X509", package: "swift-certificates"), swiftProtobuf,
  .product(name: "NIOCertificateReloading", package: "swift-nio-extras"),
  .product(name: "Hummingbird", package: "hummingbird"),
  .product(name: "Prometheus", package: "swift-prometheus"),
  .product(name: "GRPCInProcessTransport", package: "grpc-swift-2"),
]

let package = Package(
  name: "fpga-agent",
  platforms: [.macOS(.v15)],
  products: [
    .executable(name: "fpga-agent", targets: ["fpga-agent"]),
    .executable(name: "fpgactl", targets: ["fpgactl"]),
    .executable(name: "fpga-agent-bench", targets: ["FPGAAgentBenchmarks"]),
    .executable(name: "fpga-orchestrator-example", targets: ["ExampleOrchestrator"]),
  ],
  dependencies: [
    .package(url: "https://github.com/grpc/grpc-swift-2.git", exact: "2.4.3"),
    .package(url: "https://github.com/grpc/grpc-swift-nio-transport.git", exact: "2.9.2"),
    .package(url: "https://github.com/grpc/grpc-swift-protobuf.git", exact: "2.4.1"),
    .package(url: "https://github.com/apple/swift-protobuf.git", exact: "1.39.0"),
    .package(url: "https://github.com/apple/swift-log.git", exact: "1.16.2"),
    .package(url: "https://github.com/apple/swift-argument-parser.git", exact: "1.8.2"),
    .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", exact: "2.13.0"),
    .package(url: "https://github.com/jpsim/Yams.git", exact: "6.2.2"),
    .package(url: "https://github.com/groue/GRDB.swift.git", exact: "7.10.0"),
    .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
    .package(url: "https://github.com/apple/swift-nio-http2.git", from: "1.46.0"),
    .package(url: "https://github.com/apple/swift-certificates.git", from: "1.21.1"),
    .package(url: "https://github.com/apple/swift-nio-extras.git", from: "1.35.2"),
    .package(url: "https://github.com/hummingbird-project/hummingbird.git", exact: "2.28.1", traits: []),
    .package(url: "https://github.com/swift-server/swift-prometheus.git", exact: "2.4.1"),
    .package(url: "https://github.com/swift-server/async-http-client.git", exact: "1.37.0"),
    .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.6"),
  ],
  targets: [
    // The domain: inventory, allocation rules, revisions, kernel rules. No I/O.
    .target(name: "FPGACore"),
    // The simulated node: cards, PFs, VFs under the kernel's SR-IOV rules.
    .target(name: "FPGASimulator", dependencies: ["FPGACore", "FPGALinux"]),
    // The Linux platform: sysfs SR-IOV, QDMA and VFIO behind narrow protocols.
    .target(name: "FPGALinux", dependencies: ["FPGACore"]),
    // The durable state: allocations, idempotency keys, epoch, journal, in SQLite.
    .target(name: "FPGAStore", dependencies: ["FPGACore", .product(name: "GRDB", package: "GRDB.swift")]),
    // A client of the QEMU Machine Protocol, usable on its own.
    .target(name: "FPGAQMP"),
    // VMs as the core's Hypervisor: QEMU over QMP.
    .target(name: "FPGAQEMU", dependencies: ["FPGACore", "FPGAQMP"]),
    // VMs as the core's Hypervisor: domains managed by libvirt, whose C library is loaded at run
    // time (dlopen), so neither the build nor a host without libvirt needs it.
    .target(name: "FPGALibvirt", dependencies: ["FPGACore"]),
    // Generated code and the gRPC services of the node API and health.
    .target(
      name: "FPGAAgentAPI",
      dependencies: ["FPGACore", grpcCore, grpcProtobuf, swiftProtobuf, logging]
    ),
    // The kubelet device plugin (v1beta1): VFs as a Kubernetes extended resource.
    .target(
      name: "FPGADevicePlugin",
      dependencies: ["FPGACore", "FPGAAgentAPI", grpcCore, grpcHTTP2, grpcProtobuf, swiftProtobuf, logging]
    ),
    // Kubernetes DRA: the kubelet plugin (registration, prepare/unprepare, health), CDI specs,
    // ResourceSlices through a small API client (in-cluster, explicit or from a kubeconfig).
    .target(
      name: "FPGADRA",
      dependencies: [
        "FPGACore", grpcCore, grpcHTTP2, grpcProtobuf, swiftProtobuf, logging,
        .product(name: "AsyncHTTPClient", package: "async-http-client"),
        .product(name: "NIOSSL", package: "swift-nio-ssl"), .product(name: "NIOCore", package: "swift-nio"),
        .product(name: "NIOHTTP1", package: "swift-nio"), .product(name: "Yams", package: "Yams"),
      ]
    ),
    // The agent's settings (file, environment, flags; one declaration per key), its logging and
    // the few host calls they need.
    .target(name: "FPGAAgentConfig", dependencies: runtimeDependencies),
    // What every door to the node API shares: authorization, the audit trail, metrics, and the
    // in-process door the agent's own surfaces call through.
    .target(name: "FPGAAgentDoors", dependencies: runtimeDependencies + ["FPGAAgentConfig"]),
    // The web dashboard and its JSON API (Hummingbird), through the node API's door.
    .target(name: "FPGAWebDashboard", dependencies: runtimeDependencies + ["FPGAAgentConfig", "FPGAAgentDoors"]),
    // The orchestrator link: its connection as a state machine, its commands through the door.
    .target(name: "FPGAOrchestratorLink", dependencies: runtimeDependencies + ["FPGAAgentConfig", "FPGAAgentDoors"]),
    // The composition root: the daemon's services in one ServiceGroup, and its commands.
    .target(
      name: "FPGAAgentRuntime",
      dependencies: runtimeDependencies + [
        "FPGAAgentConfig", "FPGAAgentDoors", "FPGAWebDashboard", "FPGAOrchestratorLink",
      ]
    ),
    // fpgactl's subcommands, as a library so tests run them on their exact output.
    .target(
      name: "FPGACtlCommands",
      dependencies: ["FPGACore", "FPGAAgentAPI", grpcCore, grpcHTTP2, argumentParser, swiftProtobuf]
    ),
    .executableTarget(name: "fpga-agent", dependencies: ["FPGAAgentRuntime"]),
    .executableTarget(name: "fpgactl", dependencies: ["FPGACtlCommands"]),
    // An example orchestrator for the orchestrator link (tests and the demo), not a product.
    .executableTarget(
      name: "ExampleOrchestrator", dependencies: ["FPGAAgentAPI", grpcCore, grpcHTTP2, grpcProtobuf],
      path: "Examples/ExampleOrchestrator"),
    .executableTarget(
      name: "FPGAAgentBenchmarks",
      dependencies: [
        "FPGACore", "FPGASimulator", "FPGAAgentAPI", "FPGAAgentRuntime", "FPGAAgentConfig", "FPGAQEMU", "FPGAQMP",
        "FPGAStore", grpcCore, grpcHTTP2, grpcProtobuf, swiftProtobuf, logging,
      ],
      path: "Benchmarks/FPGAAgentBenchmarks"
    ),
    // Helpers shared by the test targets: a running agent on loopback, a fixed clock.
    .target(
      name: "FPGATestSupport",
      dependencies: [
        "FPGACore", "FPGALinux", "FPGASimulator", "FPGAQMP", "FPGAAgentRuntime", "FPGAAgentConfig", "FPGAAgentAPI",
        grpcCore, grpcHTTP2, logging,
      ],
      path: "Tests/FPGATestSupport"
    ),
    .testTarget(name: "FPGACoreTests", dependencies: ["FPGACore", "FPGASimulator"]),
    .testTarget(name: "FPGADRATests", dependencies: ["FPGADRA", "FPGACore", "FPGASimulator", logging]),
    .testTarget(name: "FPGASimulatorTests", dependencies: ["FPGACore", "FPGASimulator"]),
    .testTarget(name: "FPGAQMPTests", dependencies: ["FPGAQMP", "FPGATestSupport"]),
    .testTarget(name: "FPGALibvirtTests", dependencies: ["FPGALibvirt", "FPGACore"]),
    .testTarget(name: "FPGAStoreTests", dependencies: ["FPGACore", "FPGAStore", "FPGASimulator"]),
    .testTarget(name: "FPGALinuxTests", dependencies: ["FPGACore", "FPGALinux", "FPGATestSupport"]),
    .testTarget(
      name: "FPGAAgentAPITests",
      dependencies: [
        "FPGACore", "FPGASimulator", "FPGALinux", "FPGAQMP", "FPGAAgentAPI", "FPGAAgentRuntime", "FPGAAgentConfig",
        "FPGAAgentDoors", "FPGADevicePlugin", "FPGATestSupport", "FPGACtlCommands", grpcCore, grpcHTTP2, logging,
      ]
    ),
    .testTarget(
      name: "FPGACtlTests",
      dependencies: [
        "FPGACtlCommands", "FPGAAgentRuntime", "FPGAAgentConfig", "FPGAAgentAPI", "FPGACore", "FPGATestSupport",
        grpcCore, logging,
      ]
    ),
    .testTarget(
      name: "FPGAAgentRuntimeTests",
      dependencies: [
        "FPGAAgentRuntime", "FPGAAgentConfig", "FPGAAgentDoors", "FPGAWebDashboard", "FPGAOrchestratorLink",
        "FPGACore", "FPGATestSupport", logging,
      ]
    ),
  ]
)

// Stricter language settings on every target of the project: `any` spelled out for every
// existential, and members visible only through modules the file imports itself.
for target in package.targets {
  target.swiftSettings =
    (target.swiftSettings ?? []) + [
      .enableUpcomingFeature("ExistentialAny"), .enableUpcomingFeature("MemberImportVisibility"),
      .enableUpcomingFeature("InternalImportsByDefault"),
    ]
}
