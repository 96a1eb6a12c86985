//! SeaORM entities for the tables the migration creates.

pub mod co2_emissions {
    //! One row per reading; `date_time` and `emissions` are the seed's columns, kept for the
    //! dashboards and queries that already read them.
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "co2_emissions")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        /// Measurement time, UTC.
        pub date_time: Option<DateTime>,
        /// CO2 in ppm.
        pub emissions: Option<f64>,
        pub device_id: String,
        pub topic: String,
        pub received_at: DateTime,
        pub seq: Option<i64>,
        pub temperature: Option<f64>,
        pub humidity: Option<f64>,
        pub dedup_key: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod rejected_messages {
    //! Messages under `co2/#` that could not be stored as readings, with the reason.
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "rejected_messages")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub received_at: DateTime,
        pub topic: String,
        pub payload: String,
        pub payload_bytes: i32,
        pub reason: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod devices {
    //! One row per device that ever sent a reading: when it was first and last heard from.
    //! Kept current by [`crate::storage::devices`].
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "devices")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub device_id: String,
        pub first_seen: DateTime,
        pub last_seen: DateTime,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
