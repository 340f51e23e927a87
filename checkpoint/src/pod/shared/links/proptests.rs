//! Properties of the readers of the kernel's socket tables and `ss` output: any text gives
//! connections or nothing.

use proptest::prelude::*;

use super::*;
use crate::testkit::cases;

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(1000),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn socket_tables_take_any_text(lines in prop::collection::vec("[0-9A-F:u_strxq \\-\\PC]{0,80}", 0..6)) {
        let text = lines.join("\n");
        let _ = parse_tcp_table(&text);
        let _: Vec<u64> = parse_unix_table(&text).collect();
        for (_, local, peer) in parse_unix_pairs(&text) {
            prop_assert!(peer != 0);
            let _ = local;
        }
    }
}
