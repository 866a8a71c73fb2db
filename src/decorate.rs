//! Writing a decorator of an Iceberg catalog: the time limits (I10), the pinned metadata of a
//! maintenance run, the test-only fault points and the tests' scripted catalogs each change one
//! or two calls and forward the rest.

/// Implements `iceberg::Catalog` for a decorator that holds its inner catalog in `$inner`: every
/// call but `load_table` and `update_table` goes to the inner catalog unchanged, and those two
/// are the ones given (the decorators of this crate and of its tests differ only there).
#[macro_export]
macro_rules! forward_catalog {
    ($ty:ty, $inner:ident, { $($overrides:tt)* }) => {
        #[$crate::decorate::async_trait]
        impl ::iceberg::Catalog for $ty {
            async fn list_namespaces(
                &self,
                parent: Option<&::iceberg::NamespaceIdent>,
            ) -> ::iceberg::Result<Vec<::iceberg::NamespaceIdent>> {
                self.$inner.list_namespaces(parent).await
            }
            async fn create_namespace(
                &self,
                ns: &::iceberg::NamespaceIdent,
                props: ::std::collections::HashMap<String, String>,
            ) -> ::iceberg::Result<::iceberg::Namespace> {
                self.$inner.create_namespace(ns, props).await
            }
            async fn get_namespace(&self, ns: &::iceberg::NamespaceIdent) -> ::iceberg::Result<::iceberg::Namespace> {
                self.$inner.get_namespace(ns).await
            }
            async fn namespace_exists(&self, ns: &::iceberg::NamespaceIdent) -> ::iceberg::Result<bool> {
                self.$inner.namespace_exists(ns).await
            }
            async fn update_namespace(
                &self,
                ns: &::iceberg::NamespaceIdent,
                props: ::std::collections::HashMap<String, String>,
            ) -> ::iceberg::Result<()> {
                self.$inner.update_namespace(ns, props).await
            }
            async fn drop_namespace(&self, ns: &::iceberg::NamespaceIdent) -> ::iceberg::Result<()> {
                self.$inner.drop_namespace(ns).await
            }
            async fn list_tables(&self, ns: &::iceberg::NamespaceIdent) -> ::iceberg::Result<Vec<::iceberg::TableIdent>> {
                self.$inner.list_tables(ns).await
            }
            async fn create_table(
                &self,
                ns: &::iceberg::NamespaceIdent,
                creation: ::iceberg::TableCreation,
            ) -> ::iceberg::Result<::iceberg::table::Table> {
                self.$inner.create_table(ns, creation).await
            }
            async fn drop_table(&self, table: &::iceberg::TableIdent) -> ::iceberg::Result<()> {
                self.$inner.drop_table(table).await
            }
            async fn purge_table(&self, table: &::iceberg::TableIdent) -> ::iceberg::Result<()> {
                self.$inner.purge_table(table).await
            }
            async fn table_exists(&self, table: &::iceberg::TableIdent) -> ::iceberg::Result<bool> {
                self.$inner.table_exists(table).await
            }
            async fn rename_table(&self, src: &::iceberg::TableIdent, dest: &::iceberg::TableIdent) -> ::iceberg::Result<()> {
                self.$inner.rename_table(src, dest).await
            }
            async fn register_table(
                &self,
                table: &::iceberg::TableIdent,
                location: String,
            ) -> ::iceberg::Result<::iceberg::table::Table> {
                self.$inner.register_table(table, location).await
            }
            $($overrides)*
        }
    };
}

#[doc(hidden)]
pub use async_trait::async_trait;
