//! Bindings to the system's libibverbs (Debian's libibverbs-dev, rdma-core): bindgen for
//! the types and exported functions, and a C file of wrappers (compiled here) for the
//! functions verbs.h defines `static inline` (posting, polling, port queries).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let lib = pkg_config::Config::new().probe("libibverbs").expect(
        "libibverbs not found by pkg-config: install libibverbs-dev (deploy/install-deps.sh)",
    );
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let header = out.join("spool_verbs.h");
    std::fs::write(&header, "#include <infiniband/verbs.h>\n").expect("write the wrapper header");
    let includes: Vec<String> = lib
        .include_paths
        .iter()
        .map(|p| format!("-I{}", p.display()))
        .collect();
    bindgen::Builder::default()
        .header(header.to_string_lossy())
        .clang_args(&includes)
        .allowlist_function(
            "ibv_(get_device_list|free_device_list|get_device_name|open_device|close_device\
             |query_device|query_gid|alloc_pd|dealloc_pd|reg_mr|dereg_mr|create_cq|destroy_cq\
             |poll_cq|create_qp|destroy_qp|modify_qp|post_send|post_recv|wc_status_str\
             |create_comp_channel|destroy_comp_channel|req_notify_cq|get_cq_event|ack_cq_events)",
        )
        // The exported ibv_query_port is a compat symbol filling an old, shorter struct:
        // the inline ___ibv_query_port is what verbs.h's ibv_query_port macro calls.
        .allowlist_function("___ibv_query_port")
        .allowlist_type("ibv_.*")
        .allowlist_var("IBV_.*")
        // Values the provider writes must not become Rust enums (an unknown one is UB).
        .newtype_enum("ibv_(wc_status|wc_opcode|wr_opcode|qp_state|qp_type|mtu|port_state|node_type|transport_type)")
        .bitfield_enum("ibv_(access_flags|qp_attr_mask|send_flags|wc_flags)")
        .derive_default(true)
        .layout_tests(false)
        .wrap_static_fns(true)
        .wrap_static_fns_path(out.join("verbs_static"))
        .generate()
        .expect("bindgen on infiniband/verbs.h")
        .write_to_file(out.join("verbs.rs"))
        .expect("write verbs.rs");
    let mut cc = cc::Build::new();
    cc.file(out.join("verbs_static.c"))
        .include(&out)
        .warnings(false);
    for p in &lib.include_paths {
        cc.include(p);
    }
    cc.compile("spool_verbs_static");
}
